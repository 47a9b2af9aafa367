"""Messages that name the problem (issue 17, item 6): damaged images and near-duplicate domain names at planning,
folds without a train or val set, calib_evaluate's --methods/--folds/--seeds, refused calib_train requests that
write nothing, and calib_evaluate's temporary folder left by a killed run."""
import hashlib
import json
import os
import socket
from pathlib import Path

import pandas as pd
import pytest

from calibnet.cli import evaluate as evaluate_cli
from calibnet.cli import plan_and_preprocess
from calibnet.cli import train as train_cli
from calibnet.errors import CalibnetError
from calibnet.files import atomic_output_dir
from calibnet.planners.splits import build_calib_splits, get_fold
from conftest import run_cli

pytestmark = pytest.mark.slow


def _plan(*extra):
    return run_cli(plan_and_preprocess.main, ["-d", 512, "-np", 1, *extra], expect_ok=False)


def _preprocessed(raw_copy: Path) -> Path:
    return Path(os.environ["CALIBNET_DATA"]) / "preprocessed" / raw_copy.name


def _set_vendor(raw_copy: Path, case_id: str, vendor: str) -> None:
    domains = pd.read_csv(raw_copy / "domains.csv", dtype=str, keep_default_na=False)
    domains.loc[domains["case_id"] == case_id, "vendor"] = vendor
    domains.to_csv(raw_copy / "domains.csv", index=False)


def test_truncated_image_is_named_not_aborted(raw_copy):
    path = raw_copy / "imagesTr" / "C2_001_0000.nii.gz"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    result = _plan()
    assert result.exit_code == 1 and "Aborted!" not in result.output and "Traceback" not in result.output
    assert f"case C2_001: {path} cannot be read as an image (the file is truncated" in result.output, result.output
    assert not _preprocessed(raw_copy).exists()


def test_vendor_spelled_two_ways_is_refused_naming_both(raw_copy):
    _set_vendor(raw_copy, "C4_002", "siemens")
    result = _plan("--plan-only")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "vendor 'Siemens' (5 cases) and 'siemens' (1 case) differ only in case or spaces" in result.output
    assert not _preprocessed(raw_copy).exists()


def test_a_vendor_of_one_case_gets_no_fold_of_its_own(raw_copy):
    _set_vendor(raw_copy, "C4_002", "Canon")
    result = _plan("--plan-only")
    assert result.exit_code == 0, result.output
    assert "warning: scanner fold left out: the fold training on vendor Canon would have an empty val set" \
        in result.output
    splits = json.loads((_preprocessed(raw_copy) / "calib_splits.json").read_text())
    folds = splits["scanner"]["folds"]
    assert [f["source"]["vendor"] for f in folds] == ["Siemens", "GE", "Philips"]
    assert all(f["train"] and f["val"] for f in folds) and [f["fold"] for f in folds] == [0, 1, 2]
    assert "C4_002" in folds[0]["test"]  # a target of the other folds still


def test_fold_without_val_set_is_refused():
    domains = pd.DataFrame([(f"A{i}", "C1", "Siemens") for i in range(3)] + [(f"B{i}", "C2", "GE") for i in range(3)],
                           columns=["case_id", "center", "vendor"])
    splits = build_calib_splits(domains)
    splits["scanner"]["folds"][1]["val"] = []  # as a calib_splits.json written before such folds were left out
    with pytest.raises(CalibnetError, match="fold 1 trains on vendor Siemens has an empty val set"):
        get_fold(splits, "scanner", 1)


def _hand_written_run(results: Path, seed: int = 42) -> Path:
    folder = results / "Dataset511_Tiny" / "nnUNetTrainerCalib__CalibPlans__3d_fullres" / f"scanner_fold0_seed{seed}"
    folder.mkdir(parents=True)
    spec = {"dataset_id": 511, "configuration": "3d_fullres", "method": "nnunet", "fold": 0, "split": "scanner",
            "seed": seed}
    (folder / "calibnet_run.json").write_text(json.dumps({"spec": spec, "trainer": "nnUNetTrainerCalib"}))
    return folder


@pytest.mark.parametrize("flags, code, fragments", [
    (["--methods", "notamethod"], 1, ["--methods: notamethod is not a method; known methods:", "nnunet", "calsam"]),
    (["--folds", "99"], 1, ["--folds: no scanner run of Dataset511_Tiny has fold 99; trained folds: 0."]),
    (["--seeds", "7"], 1, ["--seeds: no scanner run of Dataset511_Tiny has seed 7; trained seeds: 42, 2024."]),
    (["--folds", "abc"], 2, ["'abc' is not a comma-separated list of integers"]),
    (["--seed", "-1"], 2, ["--seed"]),
])
def test_evaluate_selection_errors_say_what_exists(results, flags, code, fragments):
    _hand_written_run(results)
    _hand_written_run(results, 2024)
    result = run_cli(evaluate_cli.main, ["--split", "scanner", *flags], expect_ok=False)
    assert result.exit_code == code and "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))} if root.exists() else {}


@pytest.mark.parametrize("method, flags, fragment", [
    ("calunet", ["--lambda-fip", "nan"], "--lambda-fip nan is out of range"),
    ("nnunet", ["--lambda-fip", "0.3"], "--lambda-fip does not apply to method nnunet"),
    ("nnunet", ["--seed", "-1"], "--seed"),
])
def test_refused_train_writes_no_run_folder_and_leaves_an_existing_run_alone(results, method, flags, fragment):
    args = [511, "3d_fullres", method, 0, "--split", "scanner", "--epochs", 1, "--iters-per-epoch", 1, "--device", "cpu",
            "--num-workers", 0, *flags]
    result = run_cli(train_cli.main, args, expect_ok=False)
    assert result.exit_code in (1, 2) and "Traceback" not in result.output and fragment in result.output
    assert not results.exists() or not any(results.rglob("*")), sorted(results.rglob("*"))
    existing = _hand_written_run(results)  # the run the refused request names (seed 42, the default)
    (existing / "checkpoint_final.pth").write_bytes(b"model")
    before = _snapshot(results)
    result = run_cli(train_cli.main, args, expect_ok=False)
    assert result.exit_code in (1, 2) and fragment in result.output
    assert _snapshot(results) == before


def test_interrupted_evaluation_folder_is_cleaned_on_the_next_run(tmp_path):
    final = tmp_path / "evaluation" / "loco"
    final.parent.mkdir()
    old_style = final.parent / ".loco.k3x9_a7q.partial"  # calibnet before PIDs were in the name
    dead = final.parent / f".loco.{2 ** 22 + 12345}@{socket.gethostname()}.abcd1234.partial"
    alive = final.parent / f".loco.{os.getpid()}@{socket.gethostname()}.abcd1234.partial"
    elsewhere = final.parent / ".loco.1@another-host.abcd1234.partial"
    for folder in (old_style, dead, alive, elsewhere):
        folder.mkdir()
        (folder / "report.md").write_text("half")
    with atomic_output_dir(final, overwrite=True) as partial:
        (partial / "report.md").write_text("whole")
    assert (final / "report.md").read_text() == "whole"
    assert not old_style.exists() and not dead.exists()
    assert alive.exists() and elsewhere.exists()  # a running evaluation's, and one this host cannot judge
