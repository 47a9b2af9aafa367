"""calib_evaluate end to end: two methods trained for one epoch on the scanner split of the tiny dataset."""
import json
import math
import os
import shutil

import numpy as np
import pandas as pd
import pytest

from calibnet.cli import evaluate as evaluate_cli
from calibnet.cli import train as train_cli
from conftest import run_cli, use_data_dir
from test_evaluation_metrics import expected_aurc_over_orders as _expected_aurc

pytestmark = pytest.mark.slow
SHORT = ["--split", "scanner", "--epochs", 1, "--iters-per-epoch", 2, "--device", "cpu", "--disable-tta"]
# 3d_fullres only: other test files train 2d scanner runs of the same methods in the shared tiny dataset
EVALUATE = ["--split", "scanner", "--methods", "nnunet,samft", "--folds", 0, "--configuration", "3d_fullres"]


@pytest.fixture(scope="module")
def evaluation(tiny_dataset):
    tiny_dataset.activate()
    run_cli(train_cli.main, [511, "3d_fullres", "nnunet", 0, *SHORT, "--num-workers", 0])
    run_cli(train_cli.main, [511, "3d_fullres", "samft", 0, *SHORT, "--sam-model", "tiny"])
    output = run_cli(evaluate_cli.main, EVALUATE).output
    return output, tiny_dataset.data_dir / "results" / "Dataset511_Tiny" / "evaluation" / "scanner"


def _not_json(constant):
    raise ValueError(f"summary.json holds {constant}, which strict JSON parsers refuse")


def test_all_outputs_are_written_with_the_documented_columns(evaluation):
    output, folder = evaluation
    for name in ("per_case.csv", "per_center.csv", "per_center.md", "dgg.csv", "dgg_per_fold.csv",
                 "failure_detection.csv", "significance.csv", "posthoc_parameters.json", "summary.json", "report.md",
                 "tables.tex", "reliability.png", "risk_coverage.png", "dsc_per_domain.png", "reliability.pdf",
                 "risk_coverage.pdf", "dsc_per_domain.pdf"):
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
    # the boundary view holds fewer voxels than the ROI, so its ECE is a different number
    assert (plain["ECE_boundary"] != plain["ECE"]).all()
    assert "samft: tiny SAM, not pretrained" in output and "report:" in output
    summary = json.loads((folder / "summary.json").read_text(), parse_constant=_not_json)  # NaN is not JSON
    assert set(summary["pooled_ECE"]["nnunet"]) == {"source", "target"}
    versions = summary["versions"]
    assert versions["nnunetv2"] == "2.8.1" and versions["calibnet"] and versions["torch"]
    assert [(b["method"], b["model"]) for b in versions["backbones"]] == [("samft", "tiny")]  # nnunet has none
    for column in ("configuration", "ECE_boundary", "ACE_boundary", "Brier_boundary"):
        assert column in per_case.columns, column
    assert set(per_case["configuration"]) == {"3d_fullres"}
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
    per_case = pd.read_csv(folder / "per_case.csv")
    target = per_case[(per_case.method == "nnunet") & (per_case.role == "target")]
    confidence, risk = target["conf_mean_max_probability_foreground"].values, 1 - target["DSC"].values
    expected = _expected_aurc(confidence, risk)
    oracle = _expected_aurc(-risk, risk)
    pooled = nnunet[nnunet.domain == "pooled"].iloc[0]
    assert pooled["AURC"] == pytest.approx(expected, abs=1e-9)
    assert pooled["eAURC"] == pytest.approx(expected - oracle, abs=1e-9)
    assert pooled["direction"] == "↑ confidence"
    entropy = failure[(failure.method == "nnunet") & (failure.score == "entropy_foreground") & (failure.domain == "pooled")]
    if not entropy.empty:  # an uncertainty: ranked by its negation
        assert entropy["AURC"].iloc[0] == pytest.approx(
            _expected_aurc(-target["conf_entropy_foreground"].values, risk), abs=1e-9)
    assert "predicted_foreground_voxels" not in set(failure.score)


def _roi_voxels(tiny_dataset, folder, case_id):
    """(C, N) stored probabilities and (N,) labels of a case's non-zero input voxels, read by hand."""
    import SimpleITK as sitk

    read = lambda path: sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    probabilities = np.load(folder / f"{case_id}.npz")["probabilities"].astype(np.float64)
    roi = read(tiny_dataset.raw / "imagesTr" / f"{case_id}_0000.nii.gz") != 0
    return probabilities[:, roi], read(tiny_dataset.raw / "labelsTr" / f"{case_id}.nii.gz")[roi].astype(np.int64)


def _run_folder(tiny_dataset, trainer="nnUNetTrainerCalib"):
    return tiny_dataset.data_dir / "results" / "Dataset511_Tiny" / f"{trainer}__CalibPlans__3d_fullres" / \
        "scanner_fold0_seed42"


def test_posthoc_rows_are_the_fitted_maps_applied_to_the_stored_probabilities(tiny_dataset, evaluation):
    from calibnet.metrics.calibration import calibration_metrics
    from calibnet.evaluation.posthoc import apply_dirichlet, apply_temperature

    _, folder = evaluation
    parameters = json.loads((folder / "posthoc_parameters.json").read_text())["nnunet fold 0 seed 42"]
    per_case = pd.read_csv(folder / "per_case.csv")
    case_id = per_case[(per_case.method == "nnunet + TS")]["case_id"].iloc[0]
    p, y = _roi_voxels(tiny_dataset, _run_folder(tiny_dataset) / "predictions" / "test", case_id)
    for suffix, calibrated in (("TS", apply_temperature(p, parameters["temperature"])),
                               ("Dirichlet", apply_dirichlet(p, parameters["dirichlet"]))):
        row = per_case[(per_case.method == f"nnunet + {suffix}") & (per_case.case_id == case_id)].iloc[0]
        expected = calibration_metrics(calibrated, y)
        for metric in ("ECE", "ACE", "Brier"):
            assert row[metric] == pytest.approx(expected[metric], abs=1e-6), (suffix, metric)


def test_pooled_ece_per_vendor_is_the_ece_of_all_its_voxels(tiny_dataset, evaluation):
    from calibnet.metrics.calibration import calibration_metrics

    _, folder = evaluation
    per_case = pd.read_csv(folder / "per_case.csv")
    summary = json.loads((folder / "summary.json").read_text())
    target = per_case[(per_case.method == "nnunet") & (per_case.role == "target")]
    for vendor, cases in target.groupby("vendor"):
        voxels = [_roi_voxels(tiny_dataset, _run_folder(tiny_dataset) / "predictions" / "test", c) for c in cases.case_id]
        expected = calibration_metrics(np.concatenate([v[0] for v in voxels], 1), np.concatenate([v[1] for v in voxels]))
        assert summary["pooled_ECE"]["nnunet"]["target"]["ROI"]["vendor"][vendor] == pytest.approx(expected["ECE"],
                                                                                                     abs=1e-9)
    pooled = pd.read_csv(folder / "pooled_calibration.csv")
    assert {"all", "center", "vendor"} == set(pooled["by"]) and {"ROI", "boundary"} == set(pooled["view"])
    assert "## Pooled calibration" in (folder / "report.md").read_text()


def test_stored_probabilities_reproduce_in_memory_calibration(tiny_dataset, evaluation, tmp_path, monkeypatch):
    """Confident logits (8.7 for the predicted class, 0 for the others: p ≈ 0.9998) are where float16 storage
    rounds p by ~1e-4 and moves ECE by more than 1e-5; the stored file must reproduce the in-memory metrics."""
    import nnunetv2.inference.export_prediction as export
    import SimpleITK as sitk
    import torch

    from calibnet.metrics.calibration import calibration_metrics
    from calibnet.inference import load_model, predict_cases, raw_case_inputs

    model = load_model(_run_folder(tiny_dataset), "cpu", use_mirroring=False, with_heads=False)
    predict_logits = model.predictor.predict_logits_from_preprocessed_data

    def confident(data):
        logits = predict_logits(data)
        return 8.7 * torch.nn.functional.one_hot(logits.argmax(0), logits.shape[0]).movedim(-1, 0).float()

    model.predictor.predict_logits_from_preprocessed_data = confident
    in_memory = []
    original_export = export.export_prediction_from_logits

    def capturing_export(logits, properties, configuration_manager, plans_manager, dataset_json, *args, **kwargs):
        label_manager = plans_manager.get_label_manager(dataset_json)
        in_memory.append(export.convert_predicted_logits_to_segmentation_with_correct_shape(
            logits, plans_manager, configuration_manager, label_manager, properties, return_probabilities=True)[1])
        return original_export(logits, properties, configuration_manager, plans_manager, dataset_json, *args, **kwargs)

    monkeypatch.setattr(export, "export_prediction_from_logits", capturing_export)
    case_id = json.loads((tiny_dataset.preprocessed / "calib_splits.json").read_text())["scanner"]["folds"][0]["test"][0]
    predict_cases(model, raw_case_inputs(tiny_dataset.raw, [case_id], model.dataset_json), tmp_path, progress=False)
    roi = sitk.GetArrayFromImage(sitk.ReadImage(str(tiny_dataset.raw / "imagesTr" / f"{case_id}_0000.nii.gz"))) != 0
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(tiny_dataset.raw / "labelsTr" / f"{case_id}.nii.gz")))[roi]
    labels = labels.astype(np.int64)
    memory = np.asarray(in_memory[0], np.float32)[:, roi]
    expected = calibration_metrics(memory, labels)
    rounded = calibration_metrics(memory.astype(np.float16).astype(np.float32), labels)
    assert abs(rounded["ECE"] - expected["ECE"]) > 1e-5  # the loss this test guards against
    stored = np.load(tmp_path / f"{case_id}.npz")["probabilities"][:, roi].astype(np.float32)
    observed = calibration_metrics(stored, labels)
    for metric in ("ECE", "ACE", "Brier"):
        assert observed[metric] == pytest.approx(expected[metric], abs=1e-5), metric


def test_bad_requests(tiny_dataset, evaluation, tmp_path):
    use_data_dir(tmp_path)
    result = run_cli(evaluate_cli.main, ["--split", "loco"], expect_ok=False)
    assert result.exit_code == 1 and "no trained loco runs" in result.output
    tiny_dataset.activate()
    result = run_cli(evaluate_cli.main, ["--split", "scanner", "--methods", "nnunet,calsam", "--folds", 0,
                                                 "--configuration", "3d_fullres"])
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


def _compute_rows(report: str) -> tuple[str, list]:
    """(caption, table rows as lists of cells, header first) of the report's compute-time section."""
    section = report.split("## Compute time (seconds)")[1].split("\n## ")[0]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in section.splitlines()
            if line.startswith("|")]
    return section, [rows[0]] + rows[2:]


def test_compute_time_shows_the_recorded_seconds(tiny_dataset, evaluation):
    _, folder = evaluation
    tiny_dataset.activate()  # evaluated again: an earlier test's calib_evaluate may have replaced the folder
    run_cli(evaluate_cli.main, EVALUATE)
    section, rows = _compute_rows((folder / "report.md").read_text())
    compute = pd.read_csv(folder / "compute_time.csv").set_index("method")
    summary = json.loads((folder / "summary.json").read_text())["compute_seconds"]
    assert 0 < summary["evaluation"] and f"This evaluation (calib_evaluate up to writing this report): " \
        f"{summary['evaluation']:.1f} s." in section
    assert rows[0] == ["method", "runs", "timed", "training s", "prediction s"]
    for method, trainer in (("nnunet", "nnUNetTrainerCalib"), ("samft", "nnUNetTrainerSAMFT")):
        seconds = json.loads((_run_folder(tiny_dataset, trainer) / "calibnet_run.json").read_text())["seconds"]
        assert compute.loc[method, "runs"] == compute.loc[method, "timed"] == 1
        assert compute.loc[method, "training s"] == pytest.approx(seconds["training"], abs=1e-9)
        assert compute.loc[method, "prediction s"] == pytest.approx(seconds["prediction"], abs=1e-9)
        assert [method, "1", "1", f"{seconds['training']:.1f}", f"{seconds['prediction']:.1f}"] in rows


def test_compute_time_of_hand_written_records(tiny_dataset, evaluation, tmp_path):
    """Two nnunet runs (training 10 and 20 s, prediction 2.5 and 3.5 s, a plain head on the first), a samft run
    recorded before seconds were kept: the report shows the means over the runs that recorded each step and
    "—" for samft."""
    data = tmp_path / "data"
    results = data / "results" / "Dataset511_Tiny"
    for name in ("raw", "preprocessed"):
        (data / name).mkdir(parents=True)
        os.symlink(tiny_dataset.data_dir / name / "Dataset511_Tiny", data / name / "Dataset511_Tiny")
    records = {("nnUNetTrainerCalib", 42): {"training": 10.0, "prediction": 2.5,
                                           "confidence_heads": {"confidence_head_plain": {"training": 4.0,
                                                                                          "scoring": 1.5}}},
               ("nnUNetTrainerCalib", 43): {"training": 20.0, "prediction": 3.5},
               ("nnUNetTrainerSAMFT", 42): None}
    for (trainer, seed), seconds in records.items():
        folder = results / f"{trainer}__CalibPlans__3d_fullres" / f"scanner_fold0_seed{seed}"
        shutil.copytree(_run_folder(tiny_dataset, trainer), folder, ignore=shutil.ignore_patterns("*.pth"))
        record = json.loads((folder / "calibnet_run.json").read_text())
        record["spec"]["seed"] = seed
        record.pop("seconds", None)
        if seconds is not None:
            record["seconds"] = seconds
        (folder / "calibnet_run.json").write_text(json.dumps(record))
    use_data_dir(data)
    run_cli(evaluate_cli.main, ["--split", "scanner", "--folds", 0])
    folder = results / "evaluation" / "scanner"
    _, rows = _compute_rows((folder / "report.md").read_text())
    assert rows == [["method", "runs", "timed", "training s", "prediction s"],  # no prompt-setting sets
                    ["nnunet", "2", "2", "15.0", "3.0"],
                    ["nnunet + confidence_head_plain", "1", "1", "4.0", "1.5"],
                    ["samft", "1", "0", "—", "—"]]
    compute = pd.read_csv(folder / "compute_time.csv")
    assert compute["method"].tolist() == ["nnunet", "nnunet + confidence_head_plain", "samft"]
    assert compute["runs"].tolist() == [2, 1, 1] and compute["timed"].tolist() == [2, 1, 0]
    assert compute["training s"].tolist()[:2] == [15.0, 4.0] and math.isnan(compute["training s"].iloc[2])
    assert compute["prediction s"].tolist()[:2] == [3.0, 1.5] and compute["prompt settings s"].isna().all()
    per_run = pd.read_csv(folder / "compute_time_per_run.csv")
    assert sorted(per_run["training s"].dropna()) == [4.0, 10.0, 20.0] and len(per_run) == 4
    summary = json.loads((folder / "summary.json").read_text())["compute_seconds"]
    assert summary["methods"][2] == {"method": "samft", "runs": 1, "timed": 0, "training s": None,
                                     "prediction s": None, "prompt settings s": None}
    assert summary["methods"][0]["training s"] == 15.0 and summary["evaluation"] > 0
