"""calib_predict's output folder and input checks: -o never inside -i, earlier predictions kept unless --overwrite
(then replaced, never merged), warnings for unused channels and far spacings, calibnet's own message for channels
on different grids, and nothing left behind by a refused or failed prediction."""
import json
import shutil

import pytest
import SimpleITK as sitk

from calibnet.cli import predict as predict_cli
from calibnet.inference.new_images import write_prediction_set
from conftest import run_cli


def _incoming(tiny_dataset, folder, cases=("C4_000",)):
    folder.mkdir(parents=True)
    for case in cases:
        for channel in (0, 1):
            shutil.copy(tiny_dataset.raw / "imagesTr" / f"{case}_{channel:04d}.nii.gz", folder)
    return folder


def _predict(nnunet_run, incoming, out, *extra, expect_ok=True):
    nnunet_run.activate()
    return run_cli(predict_cli.main, ["-d", 511, "-m", "nnunet", "-f", 0, "-i", incoming, "-o", out, "--device", "cpu",
                                      "--disable-tta", *extra], expect_ok=expect_ok)


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _scale_spacing(path, factor):
    image = sitk.ReadImage(str(path))
    image.SetSpacing([s * factor for s in image.GetSpacing()])
    sitk.WriteImage(image, str(path))


@pytest.mark.parametrize("inside", [False, True])
def test_output_in_the_input_folder_is_refused(nnunet_run, tiny_dataset, tmp_path, inside):
    incoming = _incoming(tiny_dataset, tmp_path / "incoming")
    before = _files(incoming)
    out = incoming / "predictions" if inside else incoming
    result = _predict(nnunet_run, incoming, out, expect_ok=False)
    assert result.exit_code == 1 and "Traceback" not in result.output
    where = f"is inside the input folder {incoming}" if inside else "is the input folder"
    assert f"Error: -o {out} {where}: the predictions written there would be read as images" in result.output
    assert _files(incoming) == before and sorted(p.name for p in incoming.iterdir()) == sorted(before)


def test_earlier_predictions_are_kept_unless_overwrite_which_replaces_them_whole(nnunet_run, tiny_dataset, tmp_path):
    out = tmp_path / "out"
    _predict(nnunet_run, _incoming(tiny_dataset, tmp_path / "first", ("C4_000",)), out)
    (out / "notes.txt").write_text("mine")
    before = _files(out)
    second = _incoming(tiny_dataset, tmp_path / "second", ("C3_001",))
    result = _predict(nnunet_run, second, out, expect_ok=False)
    assert result.exit_code == 1
    assert f"Error: {out} already holds predictions (C4_000.nii.gz, C4_000.npz, C4_000.pkl and 3 more); pass " \
           f"--overwrite" in result.output
    assert _files(out) == before
    _predict(nnunet_run, second, out, "--overwrite")
    assert sorted(json.loads((out / "confidence.json").read_text())) == ["C3_001"]  # no stale C4_000 entry
    assert sorted(p.name for p in out.iterdir()) == ["C3_001.nii.gz", "C3_001.npz", "C3_001.pkl", "confidence.json",
                                                      "dataset.json", "notes.txt", "plans.json"]  # no stale C4_000.pkl
    assert (out / "notes.txt").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_unused_channels_and_far_spacings_are_warned_of(nnunet_run, tiny_dataset, tmp_path):
    incoming = _incoming(tiny_dataset, tmp_path / "incoming", ("C4_000", "C3_001"))
    shutil.copy(incoming / "C4_000_0001.nii.gz", incoming / "C4_000_0002.nii.gz")
    for channel in (0, 1):
        _scale_spacing(incoming / f"C3_001_{channel:04d}.nii.gz", 0.4)
    output = _predict(nnunet_run, incoming, tmp_path / "out").output
    assert ("warning: case C4_000: C4_000_0002.nii.gz not used: the model takes 2 channel(s) (T1, FLAIR: _0000 to "
            "_0001).") in output
    assert "warning: case C3_001: voxel spacing" in output and "far from the training images'" in output
    assert "warning: case C4_000: voxel spacing" not in output
    assert "predicted 2 case(s)" in output


def test_channels_on_different_grids_get_calibnets_message_and_leave_nothing(nnunet_run, tiny_dataset, tmp_path):
    incoming = _incoming(tiny_dataset, tmp_path / "incoming")
    _scale_spacing(incoming / "C4_000_0001.nii.gz", 2.0)
    out = tmp_path / "new" / "deeper" / "out"
    result = _predict(nnunet_run, incoming, out, expect_ok=False)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "Error: case C4_000: channel C4_000_0001.nii.gz has spacing" in result.output
    assert "the channels of a case must share one voxel grid" in result.output
    assert not (tmp_path / "new").exists()


def test_a_failed_prediction_leaves_no_file_and_no_folder(tmp_path):
    def fails(folder):
        (folder / "A.nii.gz").write_text("half")
        raise RuntimeError("killed")

    out = tmp_path / "a" / "b" / "out"
    with pytest.raises(RuntimeError):
        write_prediction_set(out, ".nii.gz", fails)
    assert list(tmp_path.iterdir()) == []
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "confidence.json").write_text("{}")
    with pytest.raises(RuntimeError):
        write_prediction_set(existing, ".nii.gz", fails)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"] and _files(existing) == {"confidence.json": b"{}"}


def test_a_killed_predictions_temporary_folder_is_removed_by_the_next(tmp_path):
    import socket
    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".out.{dead.pid}@{socket.gethostname()}.abcd1234.partial"
    stale.mkdir()
    (stale / "A.nii.gz").write_text("half")
    write_prediction_set(tmp_path / "out", ".nii.gz", lambda folder: (folder / "B.nii.gz").write_text("whole"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and _files(tmp_path / "out") == {"B.nii.gz": b"whole"}


def test_output_in_the_prompts_folder_is_refused(tmp_path):
    from calibnet.errors import CalibnetError
    from calibnet.inference.new_images import check_output_outside_input

    (tmp_path / "labels").mkdir()
    with pytest.raises(CalibnetError, match="is the --prompts-from folder .* the predictions, named as its labels"):
        check_output_outside_input(tmp_path / "in", tmp_path / "labels", tmp_path / "labels")
    check_output_outside_input(tmp_path / "in", tmp_path / "out", tmp_path / "labels")
