"""calib_evaluate end to end: two methods trained for one epoch on the scanner split of the tiny dataset."""
import json

import numpy as np
import pandas as pd
import pytest

from calibnet.cli import evaluate as evaluate_cli
from calibnet.cli import train as train_cli
from conftest import run_cli, use_data_dir

pytestmark = pytest.mark.slow
SHORT = ["--split", "scanner", "--epochs", 1, "--iters-per-epoch", 2, "--device", "cpu", "--disable-tta"]


@pytest.fixture(scope="module")
def evaluation(tiny_dataset):
    tiny_dataset.activate()
    run_cli(train_cli.main, [511, "3d_fullres", "nnunet", 0, *SHORT, "--num-workers", 0])
    run_cli(train_cli.main, [511, "3d_fullres", "samft", 0, *SHORT, "--sam-model", "tiny"])
    output = run_cli(evaluate_cli.main, ["--split", "scanner", "--methods", "nnunet,samft", "--folds", 0]).output
    return output, tiny_dataset.data_dir / "results" / "Dataset511_Tiny" / "evaluation" / "scanner"


def test_all_outputs_are_written_with_the_documented_columns(evaluation):
    output, folder = evaluation
    for name in ("per_case.csv", "per_center.csv", "per_center.md", "dgg.csv", "dgg_per_fold.csv",
                 "failure_detection.csv", "significance.csv", "posthoc_parameters.json", "summary.json", "report.md",
                 "tables.tex", "reliability.png", "risk_coverage.png", "dsc_per_domain.png"):
        assert (folder / name).is_file(), name
    per_case = pd.read_csv(folder / "per_case.csv")
    for column in ("method", "split", "fold", "seed", "case_id", "center", "vendor", "scanner", "role", "DSC", "IoU",
                   "HD95", "NSD@1mm", "ECE", "ACE", "Brier", "conf_mean_max_probability_foreground", "note"):
        assert column in per_case.columns, column
    assert set(per_case["method"]) == {"nnunet", "samft", "nnunet + TS", "nnunet + Dirichlet", "samft + TS",
                                       "samft + Dirichlet"}
    plain = per_case[per_case.method == "nnunet"]
    assert set(plain[plain.role == "source"].vendor) == {"Siemens"}
    assert set(plain[plain.role == "target"].vendor) == {"GE", "Philips"}
    assert set(per_case[per_case.method == "samft"]["note"]) == {"tiny SAM, not pretrained"}
    assert "samft: tiny SAM, not pretrained" in output and "report:" in output
    summary = json.loads((folder / "summary.json").read_text())
    assert set(summary["pooled_ECE"]["nnunet"]) == {"source", "target"}
    assert summary["posthoc_parameters"]["nnunet fold 0 seed 42"]["temperature"] > 0
    per_center = pd.read_csv(folder / "per_center.csv")
    assert {"source_vendor", "vendor", "DSC mean", "DSC std", "n"} <= set(per_center.columns)
    assert "| Philips" in (folder / "report.md").read_text()


def test_dgg_is_source_minus_target_recomputed_from_per_case(evaluation):
    _, folder = evaluation
    per_case = pd.read_csv(folder / "per_case.csv")
    dgg = pd.read_csv(folder / "dgg_per_fold.csv")
    for method in ("nnunet", "samft"):
        rows = per_case[per_case.method == method]
        for metric in ("DSC", "HD95", "ECE"):
            expected = rows[rows.role == "source"][metric].mean() - rows[rows.role == "target"][metric].mean()
            assert dgg[dgg.method == method][metric].iloc[0] == pytest.approx(expected)


def test_failure_detection_pools_and_splits_by_target_vendor(evaluation):
    _, folder = evaluation
    failure = pd.read_csv(folder / "failure_detection.csv")
    nnunet = failure[(failure.method == "nnunet") & (failure.score == "mean_max_probability_foreground")]
    assert set(nnunet["domain"]) == {"pooled", "GE", "Philips"}
    assert nnunet[nnunet.domain == "pooled"]["n"].iloc[0] == 6
    assert ((failure["eAURC"] >= -1e-12) & (failure["AURC"] <= 1)).all()


def test_bad_requests(tiny_dataset, evaluation, tmp_path):
    use_data_dir(tmp_path)
    result = run_cli(evaluate_cli.main, ["--split", "loco"], expect_ok=False)
    assert result.exit_code == 1 and "no trained loco runs" in result.output
    tiny_dataset.activate()
    result = run_cli(evaluate_cli.main, ["--split", "scanner", "--methods", "nnunet,calsam", "--folds", 0])
    assert "calsam: no scanner run with predictions" in result.output


def test_temperature_scaling_does_not_increase_the_source_nll(tiny_dataset, evaluation):
    import SimpleITK as sitk

    from calibnet.evaluation.posthoc import apply_temperature, nll

    _, folder = evaluation
    temperature = json.loads((folder / "posthoc_parameters.json").read_text())["nnunet fold 0 seed 42"]["temperature"]
    run = tiny_dataset.data_dir / "results" / "Dataset511_Tiny" / "nnUNetTrainerCalib__CalibPlans__3d_fullres" / \
        "scanner_fold0_seed42" / "predictions" / "val"
    probabilities, labels = [], []
    for npz in sorted(run.glob("*.npz")):
        p = np.load(npz)["probabilities"].astype(np.float32)
        truth = sitk.GetArrayFromImage(sitk.ReadImage(str(tiny_dataset.raw / "labelsTr" / f"{npz.stem}.nii.gz")))
        image = sitk.GetArrayFromImage(sitk.ReadImage(str(tiny_dataset.raw / "imagesTr" / f"{npz.stem}_0000.nii.gz")))
        probabilities.append(p[:, image != 0])
        labels.append(truth[image != 0])
    probabilities, labels = np.concatenate(probabilities, 1), np.concatenate(labels).astype(np.int64)
    assert nll(apply_temperature(probabilities, temperature), labels) <= nll(probabilities, labels) + 1e-6
