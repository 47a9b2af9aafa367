"""calib_evaluate as a library call: every trained run of a split → per-case metrics → tables, post-hoc
calibration, failure detection, significance, report, plots — written atomically to
``$nnUNet_results/DatasetXXX/evaluation/<split>/``. Evaluation reads prediction files only."""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from calibnet.domains import DOMAINS_FILENAME, read_domains
from calibnet.errors import CalibnetError
from calibnet.metrics.calibration import pool_bins
from calibnet.evaluation.case_evaluation import evaluate_case, recalibrated_case_metrics
from calibnet.evaluation.posthoc import apply_dirichlet, apply_temperature, fit_dirichlet, fit_temperature
from calibnet.evaluation.report import plot_all, write_report
from calibnet.evaluation.tables import (compute_time, domain_generalisation_gap, failure_detection, per_domain,
                                        ranked_scores, significance)
from calibnet.files import atomic_output_dir
from calibnet.methods import method_of_trainer
from calibnet.metrics.confidence_scores import score_kind
from calibnet.paths import channel_files
from calibnet.planners.splits import get_fold, load_calib_splits
from calibnet.runs import (CONFIDENCE_FILENAME, PROMPTS_FILENAME, case_prediction_files, discover_runs, label_targets,
                           prediction_folder, prediction_set_complete, prompt_settings_of, run_labels)


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
        if case_id not in base_rows:
            continue
        ending = dataset_json["file_ending"]
        base = {k: v for k, v in base_rows[case_id].items() if not k.startswith(("DSC", "IoU", "HD95", "NSD", "ECE",
                                                                                 "ACE", "Brier", "conf_"))}
        for suffix, calibrate in (("TS", lambda p: apply_temperature(p, temperature)),
                                  ("Dirichlet", lambda p: apply_dirichlet(p, dirichlet))):
            metrics = recalibrated_case_metrics(*case_prediction_files(test_folder, case_id, ending),
                                                raw / "labelsTr" / f"{case_id}{ending}",
                                                _image_paths(raw, case_id, dataset_json), targets, calibrate)
            rows.append({**base, "method": f"{label} + {suffix}", **metrics})
    return rows, {"temperature": temperature, "dirichlet": dirichlet}


def pooled_calibration(bins_by: dict) -> tuple[pd.DataFrame, dict]:
    """ECE of all voxels pooled (equal-width bins merged exactly) per method, role and view: over all cases,
    per center and per vendor (DESIGN §7's pooled value). Returns the table and the pooled bins over all
    cases by (method, role, view), for the reliability diagrams."""
    groups = {}
    for (label, role, center, vendor, view), bins in bins_by.items():
        for by, domain in (("all", "all"), ("center", center), ("vendor", vendor)):
            groups.setdefault((label, role, view, by, domain), []).extend(bins)
    pooled = {key: pool_bins(bins) for key, bins in sorted(groups.items())}
    table = pd.DataFrame([{"method": label, "role": role, "view": view, "by": by, "domain": domain,
                           "voxels": int(bins.count.sum()), "pooled ECE": bins.expected_calibration_error()}
                          for (label, role, view, by, domain), bins in pooled.items()],
                         columns=["method", "role", "view", "by", "domain", "voxels", "pooled ECE"])
    overall = {(label, role, view): bins for (label, role, view, by, _), bins in pooled.items() if by == "all"}
    return table, overall


def _pooled_summary(table: pd.DataFrame) -> dict:
    """summary.json's pooled ECE: method -> role -> view -> {"all": ECE, "center": {...}, "vendor": {...}}."""
    summary = {}
    for row in table.to_dict("records"):
        view = summary.setdefault(row["method"], {}).setdefault(row["role"], {}).setdefault(row["view"], {})
        if row["by"] == "all":
            view["all"] = row["pooled ECE"]
        else:
            view.setdefault(row["by"], {})[row["domain"]] = row["pooled ECE"]
    return summary


def _own_prompts(record: dict) -> str:
    """What a run's own predictions were prompted with: "none" (no prompts), "default" (CalSAM's points) or
    "B100" (the ground-truth box: vanilla SAM, or a SAM-FT run trained with --sam-prompt box, as its record says)."""
    return method_of_trainer(record["trainer"]).own_prompts_of(record) if record.get("backbone") is not None else "none"


@dataclass
class _Collected:
    """What the per-case pass gathers for the tables."""
    rows: list = field(default_factory=list)
    posthoc_rows: list = field(default_factory=list)
    posthoc_parameters: dict = field(default_factory=dict)
    bins_by: dict = field(default_factory=dict)  # (label, role, center, vendor, view) -> [CalibrationBins]
    missing: list = field(default_factory=list)


@dataclass(frozen=True)
class _Dataset:
    """The raw dataset and split the runs are evaluated on."""
    raw: Path
    dataset_json: dict
    domains: pd.DataFrame
    split: str

    def label_path(self, case_id: str) -> Path:
        return self.raw / "labelsTr" / f"{case_id}{self.dataset_json['file_ending']}"

    def image_paths(self, case_id: str) -> list:
        return _image_paths(self.raw, case_id, self.dataset_json)


def incomplete_predictions(data: _Dataset, run, fold: dict, setting=None) -> str | None:
    """None when every val and test case of the run's fold has its segmentation, probabilities and confidence.json
    entry in the prediction set, else what lacks (a prediction killed before the folders were written whole, or
    files removed since)."""
    lacking = []
    for role in ("val", "test"):
        folder = prediction_folder(run.folder, role, setting)
        try:
            confidence = json.loads((folder / CONFIDENCE_FILENAME).read_text())
        except (OSError, ValueError):
            confidence = {}
        for case_id in fold[role]:
            segmentation, probabilities = case_prediction_files(folder, case_id, data.dataset_json["file_ending"])
            parts = [name for name, there in (("segmentation", segmentation.is_file()),
                                              ("probabilities", probabilities.is_file()),
                                              ("confidence.json entry", case_id in confidence)) if not there]
            if parts:
                lacking.append(f"{role} {case_id} ({', '.join(parts)})")
    if not lacking:
        return None
    more = f" and {len(lacking) - 3} more" if len(lacking) > 3 else ""
    return f"incomplete predictions: {'; '.join(lacking[:3])}{more}"


def _missing_scores(label: str, run, confidences: dict) -> list:
    """One message per confidence score that some cases of a prediction set have and others lack: failure
    detection leaves those cases out of that score's n."""
    entries = {case: {k for k, v in scores.items() if not isinstance(v, dict)} for case, scores in confidences.items()}
    every = set().union(*entries.values()) if entries else set()
    messages = []
    for name in sorted(every):
        without = sorted(case for case, keys in entries.items() if name not in keys)
        if without:
            messages.append(f"{label} fold {run.fold} seed {run.seed}: confidence score {name} is missing for "
                            f"{', '.join(without)} ({len(without)} of {len(entries)} cases): failure detection of "
                            f"{name} leaves them out")
    return messages


def _prediction_sets(data: _Dataset, run, fold: dict, label: str, collected: _Collected) -> list:
    """(setting, row label, prompts) of every complete prediction set of a run: its own, then each
    prompt-quality set (incomplete ones are reported as missing, with the command that completes them)."""
    sets = [(None, label, _own_prompts(run.record))]
    for setting in prompt_settings_of(run.folder):
        problem = "lacks val or test predictions" if not prediction_set_complete(run.folder, setting) \
            else incomplete_predictions(data, run, fold, setting)
        if problem:
            collected.missing.append(f"{label} {run.configuration} {data.split} fold {run.fold} seed {run.seed}: "
                                     f"prompts {setting}: {problem} (not evaluated; complete them with: "
                                     f"{run.completing_command(setting)})")
            continue
        described = json.loads((prediction_folder(run.folder, "val", setting) / PROMPTS_FILENAME).read_text())
        variant = " w/o UGPA" if described.get("ugpa") is False else ""
        sets.append((setting, f"{label}{variant} [{described['setting']}]", described["setting"]))
    return sets


def _evaluate_set(data: _Dataset, run, fold: dict, setting, label: str, prompts: str, rng,
                  collected: _Collected) -> None:
    """Per-case rows of one prediction set (source = val, target = test), then its post-hoc rows."""
    targets = label_targets(data.dataset_json, run.record)
    samples, base_rows = [], {}
    confidences = {}
    for role, folder_name in (("source", "val"), ("target", "test")):
        folder = prediction_folder(run.folder, folder_name, setting)
        confidence = json.loads((folder / CONFIDENCE_FILENAME).read_text())
        confidences.update({case_id: confidence.get(case_id, {}) for case_id in fold[folder_name]})
        for case_id in fold[folder_name]:  # every file is there: incomplete sets were left out before
            prediction, probabilities = case_prediction_files(folder, case_id, data.dataset_json["file_ending"])
            result = evaluate_case(prediction, probabilities, data.label_path(case_id), data.image_paths(case_id),
                                   targets, rng)
            row = {"method": label, "configuration": run.configuration, "prompts": prompts, "split": data.split,
                   "fold": run.fold, "seed": run.seed, "case_id": case_id, "role": role,
                   **data.domains.loc[case_id].to_dict(), "source_vendor": fold.get("source", {}).get("vendor", ""),
                   **result.metrics,
                   **{f"conf_{k}": v for k, v in confidence.get(case_id, {}).items() if not isinstance(v, dict)},
                   "note": run.note}
            collected.rows.append(row)
            base_rows[case_id] = row
            for view, bins in result.bins.items():
                collected.bins_by.setdefault((label, role, row["center"], row["vendor"], view), []).append(bins)
            if role == "source":
                samples.append((result.sample_probabilities, result.sample_labels))
    collected.missing += _missing_scores(label, run, confidences)
    if samples:
        extra, parameters = _posthoc_rows(label, prediction_folder(run.folder, "test", setting), fold["test"],
                                          data.raw, data.dataset_json, targets, samples, base_rows)
        collected.posthoc_rows += extra
        collected.posthoc_parameters[f"{label} fold {run.fold} seed {run.seed}"] = parameters


def compute_per_run(runs: list, labels: dict) -> pd.DataFrame:
    """The seconds calib_train recorded in each run's calibnet_run.json (``Run.seconds``), one row per run and
    one per confidence head recorded in it (``LABEL + HEAD``: its training and scoring as training and
    prediction); NaN where a step was not recorded (runs trained before seconds were kept)."""
    def number(value):
        return float(value) if isinstance(value, (int, float)) else math.nan

    rows = []
    for run in runs:
        seconds, label = run.seconds, labels[run.folder]
        prompts = [number(v) for v in (seconds.get("prediction_prompts") or {}).values()]
        base = {"configuration": run.configuration, "fold": run.fold, "seed": run.seed}
        rows.append({"method": label, **base,
                     "timed": any(k in seconds for k in ("training", "prediction", "prediction_prompts")),
                     "training s": number(seconds.get("training")), "prediction s": number(seconds.get("prediction")),
                     "prompt settings s": sum(prompts) if prompts else math.nan})
        for head, entry in sorted((seconds.get("confidence_heads") or {}).items()):
            rows.append({"method": f"{label} + {head}", **base, "timed": True,
                         "training s": number(entry.get("training")), "prediction s": number(entry.get("scoring")),
                         "prompt settings s": math.nan})
    return pd.DataFrame(rows, columns=["method", "configuration", "fold", "seed", "timed", "training s",
                                       "prediction s", "prompt settings s"])


def evaluate(results_root: Path, raw_root: Path, preprocessed_root: Path, split: str, dataset_id: int | None = None,
             methods=None, folds=None, seeds=None, seed: int = 0, progress: bool = True,
             configurations=None) -> Evaluation:
    """Evaluate every run of ``split`` and write the evaluation folder; returns the report and tables. Runs of
    one method that differ in configuration, backbone or method options get rows of their own."""
    started = time.perf_counter()
    dataset, runs, missing = discover_runs(results_root, split, dataset_id, methods, folds, seeds, configurations)
    raw = Path(raw_root) / dataset
    data = _Dataset(raw, json.loads((raw / "dataset.json").read_text()),
                    read_domains(raw / DOMAINS_FILENAME).set_index("case_id"), split)
    splits = load_calib_splits(Path(preprocessed_root) / dataset)
    runs, missing = _complete_runs(data, splits, runs, missing)
    labels = run_labels(runs)
    rng = np.random.default_rng(seed)
    collected = _Collected(missing=missing)
    for run in tqdm(runs, desc="evaluating runs", unit="run", disable=not progress):
        fold = get_fold(splits, data.split, run.fold)
        for setting, label, prompts in _prediction_sets(data, run, fold, labels[run.folder], collected):
            _evaluate_set(data, run, fold, setting, label, prompts, rng, collected)
    notes = sorted({f"{labels[r.folder]}: {r.note}" for r in runs if r.note})
    final = Path(results_root) / dataset / "evaluation" / split
    report, per_case = _write_evaluation(final, dataset, split, runs, notes, collected,
                                         compute_per_run(runs, labels), started)
    return Evaluation(final, report, per_case, collected.missing)


def _complete_runs(data: _Dataset, splits: dict, runs: list, missing: list) -> tuple[list, list]:
    """(runs whose own predictions are complete, missing + one message per other run: what lacks and the command
    that completes it); an error when no run is complete."""
    complete, missing = [], list(missing)
    for run in runs:
        problem = incomplete_predictions(data, run, get_fold(splits, data.split, run.fold))
        if problem:
            missing.append(f"{run.method} {run.configuration} {data.split} fold {run.fold} seed {run.seed}: {problem} "
                           f"(not evaluated; complete them with: {run.completing_command()})")
        else:
            complete.append(run)
    if not complete:
        raise CalibnetError(f"no {data.split} run of {data.raw.name} has complete predictions to evaluate: "
                            + "; ".join(missing))
    return complete, missing


def _json_records(table: pd.DataFrame) -> list:
    """Table rows for JSON, NaN as null."""
    return [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
            for row in table.to_dict("records")]


def _write_evaluation(final: Path, dataset: str, split: str, runs: list, notes: list, collected: _Collected,
                      compute_runs: pd.DataFrame, started: float) -> tuple[str, pd.DataFrame]:
    """Every table, summary.json, plots and the report, into ``final`` atomically; the evaluation's own
    seconds run from ``started`` (a ``time.perf_counter()`` value) to the writing of the report."""
    per_case = pd.DataFrame(collected.rows + collected.posthoc_rows)
    plain = per_case[~per_case["method"].str.contains(r" \+ ")]
    per_center = per_domain(per_case, split)
    dgg_runs, dgg = domain_generalisation_gap(plain)
    failure = failure_detection(plain, split)
    tests = significance(per_case)
    pooled, pooled_bins = pooled_calibration(collected.bins_by)
    ranked, unranked = ranked_scores(per_case)
    compute = compute_time(compute_runs)
    summary = {
        "dataset": dataset, "split": split, "runs": [str(r.folder) for r in runs], "notes": notes,
        "missing": collected.missing,
        "metrics_mean": {f"{m} | {role}": g.drop(columns=["fold", "seed"], errors="ignore").mean(numeric_only=True)
                         .to_dict() for (m, role), g in per_case.groupby(["method", "role"])},
        "pooled_ECE": _pooled_summary(pooled),
        "confidence_scores": {"ranked": {name: score_kind(name).arrow for name in ranked}, "not ranked": unranked},
        "DGG": dgg.to_dict(orient="records"),
        "posthoc_parameters": collected.posthoc_parameters,
    }
    if unranked:
        notes = notes + [f"not ranked for failure detection: {', '.join(unranked)}"]
    with atomic_output_dir(final, overwrite=True) as folder:
        for name, table in (("per_case", per_case), ("per_center", per_center), ("dgg_per_fold", dgg_runs),
                            ("dgg", dgg), ("failure_detection", failure), ("pooled_calibration", pooled),
                            ("significance", tests), ("compute_time", compute),
                            ("compute_time_per_run", compute_runs)):
            table.to_csv(folder / f"{name}.csv", index=False)
        (folder / "per_center.md").write_text(per_center.to_markdown(index=False, floatfmt=".3f"))
        (folder / "posthoc_parameters.json").write_text(json.dumps(collected.posthoc_parameters, indent=2))
        plots = plot_all(folder, per_case, pooled_bins, split)
        evaluation_seconds = time.perf_counter() - started
        summary["compute_seconds"] = {"evaluation": evaluation_seconds, "methods": _json_records(compute)}
        (folder / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
        report = write_report(folder, dataset, split, per_case, dgg, failure, tests, notes, plots, pooled,
                              compute, evaluation_seconds)
    return report, per_case
