"""calib_evaluate as a library call: every trained run of a split → per-case metrics → tables, post-hoc
calibration, failure detection, significance, report, plots — written atomically to
``$nnUNet_results/DatasetXXX/evaluation/<split>/``. Evaluation reads prediction files only."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from calibnet.domains import DOMAINS_FILENAME, read_domains
from calibnet.evaluation.calibration import calibration_metrics, pool_bins
from calibnet.evaluation.case_evaluation import evaluate_case, label_targets, read_image, roi_voxels
from calibnet.evaluation.discovery import discover_runs
from calibnet.evaluation.posthoc import apply_dirichlet, apply_temperature, fit_dirichlet, fit_temperature
from calibnet.evaluation.report import plot_all, write_report
from calibnet.evaluation.tables import domain_generalisation_gap, failure_detection, per_domain, significance
from calibnet.files import atomic_output_dir
from calibnet.inference.predict import prediction_folder, prompt_settings_of
from calibnet.paths import channel_files
from calibnet.planners.splits import get_fold, load_calib_splits


@dataclass
class Evaluation:
    folder: Path
    report: str
    per_case: pd.DataFrame
    missing: list = field(default_factory=list)


def _image_paths(raw: Path, case_id: str, dataset_json: dict) -> list:
    return channel_files(raw / "imagesTr", case_id, dataset_json)


def _posthoc_rows(label: str, test_folder: Path, role_cases: list, raw: Path, dataset_json: dict, targets, samples,
                  base_rows: dict) -> tuple[list, dict]:
    """Temperature and Dirichlet scaling fitted on the run's source samples, applied to its target cases."""
    probabilities = np.concatenate([s[0] for s in samples], 1)
    labels = np.concatenate([s[1] for s in samples])
    temperature = fit_temperature(probabilities, labels)
    dirichlet = fit_dirichlet(probabilities, labels)
    rows = []
    for case_id in role_cases:
        truth, _ = read_image(raw / "labelsTr" / f"{case_id}{dataset_json['file_ending']}")
        p, y = roi_voxels(np.load(test_folder / f"{case_id}.npz")["probabilities"].astype(np.float32), truth,
                          _image_paths(raw, case_id, dataset_json), targets)
        for suffix, calibrated in (("TS", apply_temperature(p, temperature)), ("Dirichlet", apply_dirichlet(p, dirichlet))):
            base = {k: v for k, v in base_rows[case_id].items() if not k.startswith(("DSC", "IoU", "HD95", "NSD"))
                    and not k.startswith("conf_")}
            rows.append({**base, "method": f"{label} + {suffix}", **calibration_metrics(calibrated, y)})
    return rows, {"temperature": temperature, "dirichlet": dirichlet}


def _own_prompts(record: dict) -> str:
    """What a run's own predictions were prompted with: "none" (no prompts), "default" (CalSAM's points) or
    "B100" (the ground-truth box, vanilla SAM)."""
    if record.get("backbone") is None:
        return "none"
    from calibnet.trainers.methods import method_of_trainer
    return "B100" if getattr(method_of_trainer(record["trainer"]).trainer_class(), "use_box", False) else "default"


def evaluate(results_root: Path, raw_root: Path, preprocessed_root: Path, split: str, dataset_id: int | None = None,
             methods=None, folds=None, seeds=None, seed: int = 0, progress: bool = True) -> Evaluation:
    """Evaluate every run of ``split`` and write the evaluation folder; returns the report and tables."""
    dataset, runs, missing = discover_runs(results_root, split, dataset_id, methods, folds, seeds)
    raw = Path(raw_root) / dataset
    dataset_json = json.loads((raw / "dataset.json").read_text())
    domains = read_domains(raw / DOMAINS_FILENAME).set_index("case_id")
    splits = load_calib_splits(Path(preprocessed_root) / dataset)
    rng = np.random.default_rng(seed)
    rows, posthoc_rows, posthoc_parameters, bins_by = [], [], {}, {}
    notes = sorted({f"{r.method}: {r.note}" for r in runs if r.note})
    for run in tqdm(runs, desc="evaluating runs", unit="run", disable=not progress):
        fold = get_fold(splits, split, run.fold)
        source_vendor = fold.get("source", {}).get("vendor", "")
        targets = label_targets(dataset_json, run.record)
        for setting in [None] + prompt_settings_of(run.folder):
            if setting is not None and not all((prediction_folder(run.folder, r, setting) / name).is_file()
                                               for r in ("val", "test") for name in ("confidence.json", "prompts.json")):
                missing.append(f"{run.method} fold {run.fold} seed {run.seed}: prompts {setting} lacks val or test "
                               f"predictions")
                continue
            label, prompts = run.method, _own_prompts(run.record)
            if setting is not None:
                described = json.loads((prediction_folder(run.folder, "val", setting) / "prompts.json").read_text())
                prompts = described["setting"]
                variant = " w/o UGPA" if described.get("ugpa") is False else ""
                label = f"{run.method}{variant} [{prompts}]"
            samples, base_rows = [], {}
            for role, folder_name in (("source", "val"), ("target", "test")):
                folder = prediction_folder(run.folder, folder_name, setting)
                confidence = json.loads((folder / "confidence.json").read_text())
                for case_id in fold[folder_name]:
                    prediction = folder / f"{case_id}{dataset_json['file_ending']}"
                    if not prediction.is_file():
                        missing.append(f"{label} fold {run.fold} seed {run.seed}: no prediction for {case_id}")
                        continue
                    result = evaluate_case(prediction, folder / f"{case_id}.npz",
                                           raw / "labelsTr" / f"{case_id}{dataset_json['file_ending']}",
                                           _image_paths(raw, case_id, dataset_json), targets, rng)
                    row = {"method": label, "prompts": prompts, "split": split,
                           "fold": run.fold, "seed": run.seed, "case_id": case_id, "role": role,
                           **domains.loc[case_id].to_dict(), "source_vendor": source_vendor, **result.metrics,
                           **{f"conf_{k}": v for k, v in confidence.get(case_id, {}).items()
                              if not isinstance(v, dict)},
                           "note": run.note}
                    rows.append(row)
                    base_rows[case_id] = row
                    bins_by.setdefault(label, {}).setdefault(role, []).append(result.bins)
                    if role == "source":
                        samples.append((result.sample_probabilities, result.sample_labels))
            if samples:
                extra, parameters = _posthoc_rows(label, prediction_folder(run.folder, "test", setting), fold["test"],
                                                  raw, dataset_json, targets, samples, base_rows)
                posthoc_rows += extra
                posthoc_parameters[f"{label} fold {run.fold} seed {run.seed}"] = parameters
    per_case = pd.DataFrame(rows + posthoc_rows)
    per_center = per_domain(per_case, split)
    dgg_runs, dgg = domain_generalisation_gap(per_case[~per_case["method"].str.contains(r" \+ ")])
    failure = failure_detection(per_case[~per_case["method"].str.contains(r" \+ ")], split)
    tests = significance(per_case)
    pooled = {m: {role: pool_bins(b) for role, b in by_role.items()} for m, by_role in bins_by.items()}
    summary = {
        "dataset": dataset, "split": split, "runs": [str(r.folder) for r in runs], "notes": notes, "missing": missing,
        "metrics_mean": {f"{m} | {role}": g.drop(columns=["fold", "seed"], errors="ignore").mean(numeric_only=True)
                         .to_dict() for (m, role), g in per_case.groupby(["method", "role"])},
        "pooled_ECE": {m: {role: b.expected_calibration_error() for role, b in by_role.items()}
                       for m, by_role in pooled.items()},
        "DGG": dgg.to_dict(orient="records"),
        "posthoc_parameters": posthoc_parameters,
    }
    final = Path(results_root) / dataset / "evaluation" / split
    with atomic_output_dir(final, overwrite=True) as folder:
        per_case.to_csv(folder / "per_case.csv", index=False)
        per_center.to_csv(folder / "per_center.csv", index=False)
        (folder / "per_center.md").write_text(per_center.to_markdown(index=False, floatfmt=".3f"))
        dgg_runs.to_csv(folder / "dgg_per_fold.csv", index=False)
        dgg.to_csv(folder / "dgg.csv", index=False)
        failure.to_csv(folder / "failure_detection.csv", index=False)
        tests.to_csv(folder / "significance.csv", index=False)
        (folder / "posthoc_parameters.json").write_text(json.dumps(posthoc_parameters, indent=2))
        (folder / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
        plots = plot_all(folder, per_case, pooled, split)
        report = write_report(folder, dataset, split, per_case, dgg, failure, tests, notes, plots)
    return Evaluation(final, report, per_case, missing)
