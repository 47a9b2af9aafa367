"""calib_evaluate --predictions FOLDER --name NAME (issue 18, item 4): predictions made elsewhere, in nnU-Net's
format, scored beside calibnet's runs. The external folder here is the nnunet fixture run's own val and test
predictions copied into one flat folder, as nnUNetv2_predict writes them, so every score must equal the run's."""
import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from calibnet.cli import evaluate as evaluate_cli
from calibnet.evaluation.external import EXTERNAL_SEED
from conftest import TINY_ID, TINY_NAME, _EnvSnapshot, run_cli

pytestmark = pytest.mark.slow
DATASET = f"Dataset{TINY_ID}_{TINY_NAME}"


class _Trap:
    """Unpickling this creates ``marker``: a .pkl nnU-Net-style file that must never be loaded."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def _results_copy(nnunet_run, root: Path) -> Path:
    """The fixture run's results tree without its checkpoints (evaluation reads predictions only)."""
    shutil.copytree(nnunet_run.results, root / "results", ignore=shutil.ignore_patterns("*.pth"))
    os.environ.update({"nnUNet_raw": str(nnunet_run.data_dir / "raw"),
                       "nnUNet_preprocessed": str(nnunet_run.data_dir / "preprocessed"),
                       "nnUNet_results": str(root / "results")})
    return root / "results"


def _fold(nnunet_run) -> dict:
    splits = json.loads((nnunet_run.data_dir / "preprocessed" / DATASET / "calib_splits.json").read_text())
    return splits["loco"]["folds"][0]


def _external_folder(nnunet_run, folder: Path) -> Path:
    """The run's val and test predictions in one folder (segmentation + .npz per case), a trap .pkl beside each
    case and one prediction of a train case."""
    folder.mkdir(parents=True)
    for role in ("val", "test"):
        for path in (nnunet_run.folder / "predictions" / role).iterdir():
            if path.name.endswith((".nii.gz", ".npz")):
                shutil.copy2(path, folder / path.name)
                trap = pickle.dumps(_Trap(folder.parent / "unpickled"))
                (folder / f"{path.name.split('.')[0]}.pkl").write_bytes(trap)
    some = sorted(folder.glob("*.nii.gz"))[0]
    shutil.copy2(some, folder / f"{_fold(nnunet_run)['train'][0]}.nii.gz")
    return folder


@pytest.fixture(scope="module")
def scored(nnunet_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("external")
    snapshot = _EnvSnapshot()
    try:
        results = _results_copy(nnunet_run, root)
        folder = _external_folder(nnunet_run, root / "theirs")
        output = run_cli(evaluate_cli.main, ["--split", "loco", "--predictions", folder, "--name", "theirs"]).output
    finally:
        snapshot.restore()
    return output, results / DATASET / "evaluation" / "loco", folder


def test_external_scores_equal_calibnets_for_the_same_files(nnunet_run, scored):
    output, evaluation, folder = scored
    per_case = pd.read_csv(evaluation / "per_case.csv")
    ours = per_case[per_case.method == "nnunet"].set_index(["case_id", "role"]).sort_index()
    theirs = per_case[per_case.method == "theirs"].set_index(["case_id", "role"]).sort_index()
    fold = _fold(nnunet_run)
    assert sorted(theirs.index) == sorted([(c, "source") for c in fold["val"]] + [(c, "target") for c in fold["test"]])
    for column in ("DSC", "HD95", "NSD@1mm", "ECE", "ACE", "Brier", "ECE_boundary",
                   "conf_mean_max_probability_foreground", "conf_entropy_foreground",
                   "conf_predicted_foreground_voxels"):
        np.testing.assert_allclose(theirs[column].to_numpy(float), ours[column].to_numpy(float), rtol=0, atol=1e-9,
                                   err_msg=column)
    assert set(theirs["seed"]) == {EXTERNAL_SEED} and set(theirs["configuration"]) == {"external"}
    assert {"theirs + TS", "theirs + Dirichlet"} <= set(per_case["method"])
    try:
        failure = set(pd.read_csv(evaluation / "failure_detection.csv")["method"])
    except pd.errors.EmptyDataError:  # no score varied over the cases
        failure = set()
    assert ("theirs" in failure) == ("nnunet" in failure)
    assert "theirs" in (evaluation / "report.md").read_text()
    significance = pd.read_csv(evaluation / "significance.csv")
    against = significance[["method", "baseline"]].isin(["theirs"]).any(axis=1)
    paired = significance[(significance.metric == "DSC") & against]
    assert list(paired["n"]) == [len(fold["test"])]  # each external case paired with the run's same case
    assert "theirs loco fold 0: 1 predicted cases of the fold's train set left out" in output
    assert not (folder.parent / "unpickled").exists()  # nnU-Net's .pkl files are never loaded


def test_summary_records_the_external_folder_and_its_files(scored):
    _, evaluation, folder = scored
    identity = json.loads((evaluation / "summary.json").read_text())["external"]["theirs"]
    scored_files = sorted(p for p in folder.iterdir() if p.name.endswith((".nii.gz", ".npz"))
                          and not p.name.startswith(_train_case_prefix(folder)))
    digest = hashlib.sha256()
    for path in scored_files:
        digest.update(f"{path.name}\0{hashlib.sha256(path.read_bytes()).hexdigest()}\n".encode())
    assert identity == {"folder": str(folder), "files": len(scored_files), "sha256": digest.hexdigest(),
                        "probabilities": True, "folds": [0]}


def _train_case_prefix(folder: Path) -> str:
    """The one case of the folder without an .npz: the train case copied in (left out, never scored)."""
    return next(p.name[:-len(".nii.gz")] for p in folder.glob("*.nii.gz")
                if not (folder / p.name.replace(".nii.gz", ".npz")).exists())


def test_progress_counts_cases(scored):
    output, _, _ = scored
    assert "case/s" in output or "s/case" in output


def test_missing_case_and_segmentations_only(nnunet_run, tmp_path):
    """A folder lacking a test case is not evaluated and named; one without .npz files gets segmentation metrics
    and no calibration (empty, never 0); the run is evaluated as usual."""
    results = _results_copy(nnunet_run, tmp_path)
    lacking = _external_folder(nnunet_run, tmp_path / "lacking")
    dropped = _fold(nnunet_run)["test"][0]
    (lacking / f"{dropped}.nii.gz").unlink()
    segmentations = _external_folder(nnunet_run, tmp_path / "segmentations")
    for path in segmentations.glob("*.npz"):
        path.unlink()
    output = run_cli(evaluate_cli.main, ["--split", "loco", "--predictions", lacking, "--name", "lacking",
                                         "--predictions", segmentations, "--name", "segs"]).output
    assert (f"missing: lacking loco fold 0: incomplete predictions: test {dropped} (segmentation) (not evaluated; "
            f"predict them into {lacking})") in output
    evaluation = results / DATASET / "evaluation" / "loco"
    per_case = pd.read_csv(evaluation / "per_case.csv")
    assert "lacking" not in set(per_case["method"]) and "nnunet" in set(per_case["method"])
    segs, ours = (per_case[per_case.method == m].set_index("case_id").sort_index() for m in ("segs", "nnunet"))
    np.testing.assert_allclose(segs["DSC"], ours["DSC"], rtol=0, atol=1e-12)
    assert segs[["ECE", "ACE", "Brier", "ECE_boundary"]].isna().all().all()
    assert segs["conf_mean_max_probability_foreground"].isna().all()
    assert not any(m.startswith("segs +") for m in per_case["method"])
    report = (evaluation / "report.md").read_text()
    assert "segs loco fold 0: no probabilities" in report
    calibration = report[report.index("## Calibration"):].split("\n## ")[0]
    assert any(line.startswith("| segs ") and "no probabilities" in line for line in calibration.splitlines())
    summary = json.loads((evaluation / "summary.json").read_text())
    assert summary["external"]["segs"]["probabilities"] is False
    assert any(m.startswith("lacking loco fold 0: incomplete predictions") for m in summary["missing"])


def _damage_geometry(folder: Path, case: str) -> Path:
    path = folder / f"{case}.nii.gz"
    image = sitk.ReadImage(str(path))
    image.SetSpacing([s * 2 for s in image.GetSpacing()])
    sitk.WriteImage(image, str(path))
    return path


def _rewrite_probabilities(folder: Path, case: str, change) -> Path:
    path = folder / f"{case}.npz"
    with np.load(path) as npz:
        probabilities = change(npz["probabilities"].astype(np.float32))
    np.savez_compressed(path, probabilities=probabilities)
    return path


def _nan(p):
    p[0, 0, 0, 0] = np.nan
    return p


BAD = {
    "geometry": (lambda folder, case: _damage_geometry(folder, case), "spacing"),
    "nan": (lambda folder, case: _rewrite_probabilities(folder, case, _nan), "NaN"),
    "channels": (lambda folder, case: _rewrite_probabilities(folder, case, lambda p: np.concatenate([p, p[:1] * 0])),
                 "channels, the labels need 2"),
    "logits": (lambda folder, case: _rewrite_probabilities(folder, case, lambda p: p * 7 - 3), "outside [0, 1]"),
}


@pytest.mark.parametrize("damage", sorted(BAD))
def test_bad_external_files_are_refused_naming_the_file_with_nothing_written(nnunet_run, tmp_path, damage):
    results = _results_copy(nnunet_run, tmp_path)
    folder = _external_folder(nnunet_run, tmp_path / "theirs")
    make, expected = BAD[damage]
    path = make(folder, _fold(nnunet_run)["test"][-1])
    result = run_cli(evaluate_cli.main, ["--split", "loco", "--predictions", folder, "--name", "theirs"],
                     expect_ok=False)
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert str(path) in result.output and expected in result.output, result.output
    assert not (results / DATASET / "evaluation").exists()


@pytest.mark.parametrize("names, expected", [(["nnunet"], "is a calibnet method"),
                                             (["calsam (mine)"], "is a calibnet method"),
                                             (["mine + TS"], "' + '"),
                                             (["a", "b"], "1 --predictions and 2 --name")])
def test_bad_names_are_refused_with_nothing_written(nnunet_run, tmp_path, names, expected):
    results = _results_copy(nnunet_run, tmp_path)
    (tmp_path / "theirs").mkdir()
    args = ["--split", "loco", "--predictions", tmp_path / "theirs"] + [a for n in names for a in ("--name", n)]
    result = run_cli(evaluate_cli.main, args, expect_ok=False)
    assert result.exit_code != 0 and expected in result.output, result.output
    assert not (results / DATASET / "evaluation").exists()


def test_probability_scores_by_hand():
    """The probability scores calibnet's predictions write and calib_evaluate computes for external ones."""
    from calibnet.metrics.confidence_scores import case_confidence

    softmax = np.array([[0.2, 0.9], [0.8, 0.1]]).reshape(2, 2, 1, 1)  # voxel 0 predicted foreground, voxel 1 not
    scores = case_confidence(softmax, False)
    entropy = -(0.2 * np.log(0.2) + 0.8 * np.log(0.8)) / np.log(2)
    assert scores["predicted_foreground_voxels"] == 1
    assert scores["mean_max_probability_foreground"] == pytest.approx(0.8)
    assert scores["entropy_foreground"] == pytest.approx(entropy, rel=1e-6)
    nothing = case_confidence(np.array([[0.7, 0.9], [0.3, 0.1]]).reshape(2, 2, 1, 1), False)  # all voxels then
    assert nothing["predicted_foreground_voxels"] == 0 and nothing["mean_max_probability_foreground"] == pytest.approx(0.8)