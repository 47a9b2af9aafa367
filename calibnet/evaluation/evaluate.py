"""calib_evaluate as a library call: every trained run of a split → per-case metrics → tables, post-hoc
calibration, failure detection, significance, report, plots — written atomically to
``$nnUNet_results/DatasetXXX/evaluation/<split>/``. Evaluation reads prediction files only."""
from __future__ import annotations

import importlib.metadata
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
from calibnet.evaluation.case_evaluation import CaseJob, case_pool, evaluate_cases, recalibrated_case_metrics
from calibnet.evaluation.external import ExternalSet, external_identity, external_predictions, external_set
from calibnet.evaluation.posthoc import apply_dirichlet, apply_temperature, fit_dirichlet, fit_temperature
from calibnet.evaluation.report import plot_all, write_report
from calibnet.evaluation.tables import (compute_time, domain_generalisation_gap, failure_detection, per_domain,
                                        ranked_scores, significance)
from calibnet.files import atomic_output_dir
from calibnet.methods import method_of_trainer
from calibnet.metrics.confidence_scores import score_kind
from calibnet.paths import channel_files
from calibnet.planners.splits import get_fold, load_calib_splits
from calibnet.runs import (CONFIDENCE_FILENAME, PROMPTS_FILENAME, ROLES, LabelTargets, case_prediction_files,
                           discover_runs, label_targets, prediction_folder, prediction_set_complete,
                           prompt_settings_of, run_labels)


@dataclass
class Evaluation:
    folder: Path
    report: str
    per_case: pd.DataFrame
    missing: list = field(default_factory=list)


# a spawned worker imports calibnet and torch (seconds): evaluations of fewer cases each are scored in-process
MIN_CASES_PER_WORKER = 16

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
    per center and per vendor (DESIGN §7's pooled value). Returns the table and the pooled bins by (method, role,
    view, by, domain), for the reliability diagrams."""
    groups = {}
    for (label, role, center, vendor, view), bins in bins_by.items():
        for by, domain in (("all", "all"), ("center", center), ("vendor", vendor)):
            groups.setdefault((label, role, view, by, domain), []).extend(bins)
    pooled = {key: pool_bins(bins) for key, bins in sorted(groups.items())}
    table = pd.DataFrame([{"method": label, "role": role, "view": view, "by": by, "domain": domain,
                           "voxels": int(bins.count.sum()), "pooled ECE": bins.expected_calibration_error()}
                          for (label, role, view, by, domain), bins in pooled.items()],
                         columns=["method", "role", "view", "by", "domain", "voxels", "pooled ECE"])
    return table, pooled


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
    external: dict = field(default_factory=dict)  # NAME -> identity of external predictions (summary.json)
    tick: object = lambda: None  # called once per case scored (the progress bar)
    pool: object = None  # worker processes scoring the cases (case_evaluation.case_pool), None: this process


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


@dataclass(frozen=True)
class _ScoredSet:
    """One prediction set to score: the columns its rows start with (method … seed), the folder of each role
    (val, test), the targets, the note of its rows, its confidence.json entries by case (None: the scores of its
    probabilities, as for external predictions) and whether it has probabilities."""
    columns: dict
    folders: dict
    targets: LabelTargets
    note: str
    confidences: dict | None
    probabilities: bool = True


def _evaluate_set(data: _Dataset, run, fold: dict, setting, label: str, prompts: str, rng,
                  collected: _Collected) -> None:
    """Per-case rows of one prediction set of a run (source = val, target = test), then its post-hoc rows."""
    folders = {role: prediction_folder(run.folder, role, setting) for role in ROLES}
    confidences = {}
    for role, folder in folders.items():
        confidence = json.loads((folder / CONFIDENCE_FILENAME).read_text())
        confidences.update({case_id: confidence.get(case_id, {}) for case_id in fold[role]})
    collected.missing += _missing_scores(label, run, confidences)
    columns = {"method": label, "configuration": run.configuration, "prompts": prompts, "split": data.split,
               "fold": run.fold, "seed": run.seed}
    _score_set(data, fold, _ScoredSet(columns, folders, label_targets(data.dataset_json, run.record), run.note,
                                      confidences), rng, collected)


def _evaluate_external(data: _Dataset, external: ExternalSet, fold: dict, rng, collected: _Collected) -> None:
    """Per-case rows of external predictions on one fold: every role from the one folder, scores from the
    probabilities, targets every label of the dataset."""
    columns = {"method": external.predictions.name, "configuration": external.configuration, "prompts": "none",
               "split": data.split, "fold": external.fold, "seed": external.seed}
    folders = {role: external.predictions.folder for role in ROLES}
    _score_set(data, fold, _ScoredSet(columns, folders, label_targets(data.dataset_json, {}), external.note, None,
                                      external.probabilities), rng, collected)


def _score_set(data: _Dataset, fold: dict, scored: _ScoredSet, rng, collected: _Collected) -> None:
    """The rows of a set's val (source) and test (target) cases, then its post-hoc rows (with probabilities)."""
    samples, base_rows = [], {}
    cases = [(role, case_id) for role, folder_name in (("source", "val"), ("target", "test"))
             for case_id in fold[folder_name]]  # every file is there: incomplete sets were left out before
    jobs = []
    for role, case_id in cases:
        prediction, probabilities = case_prediction_files(scored.folders["val" if role == "source" else "test"],
                                                          case_id, data.dataset_json["file_ending"])
        jobs.append(CaseJob(prediction, probabilities if scored.probabilities else None, data.label_path(case_id),
                            data.image_paths(case_id), scored.targets, with_scores=scored.confidences is None))
    for (role, case_id), result in zip(cases, evaluate_cases(jobs, rng, collected.pool)):
        confidence = result.confidence if scored.confidences is None else scored.confidences.get(case_id, {})
        row = {**scored.columns, "case_id": case_id, "role": role,
               **data.domains.loc[case_id].to_dict(), "source_vendor": fold.get("source", {}).get("vendor", ""),
               "held_out_center": fold.get("held_out", {}).get("center", ""),
               **result.metrics,
               **{f"conf_{k}": v for k, v in confidence.items() if not isinstance(v, dict)},
               "note": scored.note}
        collected.rows.append(row)
        collected.tick()
        base_rows[case_id] = row
        for view, bins in result.bins.items():
            collected.bins_by.setdefault((row["method"], role, row["center"], row["vendor"], view), []).append(bins)
        if role == "source" and result.sample_probabilities is not None:
            samples.append((result.sample_probabilities, result.sample_labels))
    if samples:
        label = scored.columns["method"]
        extra, parameters = _posthoc_rows(label, scored.folders["test"], fold["test"], data.raw, data.dataset_json,
                                          scored.targets, samples, base_rows)
        collected.posthoc_rows += extra
        collected.posthoc_parameters[f"{label} fold {scored.columns['fold']} seed {scored.columns['seed']}"] = \
            parameters


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
             configurations=None, predictions=(), names=(), num_processes: int = 1) -> Evaluation:
    """Evaluate every run of ``split`` and write the evaluation folder; returns the report and tables. Runs of
    one method that differ in configuration, backbone or method options get rows of their own. ``predictions``
    and ``names``: folders of predictions made elsewhere and the row label of each (``calibnet.evaluation.external``),
    scored on ``folds`` (default: the folds of the runs evaluated). ``num_processes``: worker processes scoring
    cases (the results are the same for any number)."""
    started = time.perf_counter()
    externals = external_predictions(predictions, names)
    dataset, runs, missing = discover_runs(results_root, split, dataset_id, methods, folds, seeds, configurations)
    raw = Path(raw_root) / dataset
    data = _Dataset(raw, json.loads((raw / "dataset.json").read_text()),
                    read_domains(raw / DOMAINS_FILENAME).set_index("case_id"), split)
    splits = load_calib_splits(Path(preprocessed_root) / dataset)
    runs, missing = _complete_runs(data, splits, runs, missing)
    collected = _Collected(missing=missing)
    outside, external_notes = _external_sets(data, splits, externals, folds or sorted({r.fold for r in runs}),
                                             collected)
    if not runs and not outside:
        also = " and no external prediction folder" if externals else ""
        raise CalibnetError(f"no {split} run of {dataset}{also} has complete predictions to evaluate: "
                            + "; ".join(collected.missing))
    labels = run_labels(runs)
    work = [(run, get_fold(splits, split, run.fold)) for run in runs]
    work = [(run, fold, _prediction_sets(data, run, fold, labels[run.folder], collected)) for run, fold in work]
    cases = sum(len(get_fold(splits, split, s.fold)["val"]) + len(get_fold(splits, split, s.fold)["test"])
                for s in outside) + sum(len(sets) * (len(fold["val"]) + len(fold["test"])) for _, fold, sets in work)
    rng = np.random.default_rng(seed)
    with tqdm(total=cases, desc="evaluating", unit="case", disable=not progress) as bar, \
            case_pool(min(num_processes, cases // MIN_CASES_PER_WORKER)) as collected.pool:
        collected.tick = lambda: bar.update(1)
        outside_rng = np.random.default_rng(seed)  # a stream of their own: the runs' post-hoc fits stay as without
        for external in outside:  # first: a bad external file stops the evaluation before the runs' long pass
            _evaluate_external(data, external, get_fold(splits, split, external.fold), outside_rng, collected)
        for run, fold, sets in work:
            for setting, label, prompts in sets:
                _evaluate_set(data, run, fold, setting, label, prompts, rng, collected)
    collected.external = external_identity(outside)
    notes = sorted({f"{labels[r.folder]}: {r.note}" for r in runs if r.note}) + external_notes
    final = Path(results_root) / dataset / "evaluation" / split
    report, per_case = _write_evaluation(final, dataset, split, runs, notes, collected,
                                         compute_per_run(runs, labels), started)
    return Evaluation(final, report, per_case, collected.missing)


def _external_sets(data: _Dataset, splits: dict, externals: list, folds: list, collected: _Collected) -> tuple:
    """(ExternalSet per external folder and fold that has every val and test case, notes); the others are added
    to ``collected.missing``. Every segmentation scored is checked against its raw label first."""
    sets, notes = [], []
    for external in externals:
        for fold in folds:
            scored, messages = external_set(external, data.split, get_fold(splits, data.split, fold), data)
            if scored is None:
                collected.missing += messages
            else:
                sets.append(scored)
                notes += messages
    return sets, notes


def _complete_runs(data: _Dataset, splits: dict, runs: list, missing: list) -> tuple[list, list]:
    """(runs whose own predictions are complete, missing + one message per other run: what lacks and the command
    that completes it)."""
    complete, missing = [], list(missing)
    for run in runs:
        problem = incomplete_predictions(data, run, get_fold(splits, data.split, run.fold))
        if problem:
            missing.append(f"{run.method} {run.configuration} {data.split} fold {run.fold} seed {run.seed}: {problem} "
                           f"(not evaluated; complete them with: {run.completing_command()})")
        else:
            complete.append(run)
    return complete, missing


def _json_records(table: pd.DataFrame) -> list:
    """Table rows for JSON, NaN as null."""
    return [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
            for row in table.to_dict("records")]


def json_safe(value):
    """``value`` with NaN and ±inf as None and numpy scalars as Python numbers, for strict JSON (RFC 8259 has no
    NaN)."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def software_versions(runs: list) -> dict:
    """calibnet, nnunetv2 and torch versions, and each evaluated run's backbone weights (its calibnet_run.json
    ``"backbone"`` record: model, checkpoint, source, sha256) for summary.json."""
    versions = {}
    for package in ("calibnet", "nnunetv2", "torch"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    fields = ("model", "checkpoint", "source", "sha256")
    versions["backbones"] = [{"run": str(run.folder), "method": run.method,
                              **{k: run.record["backbone"].get(k) for k in fields}}
                             for run in runs if run.record.get("backbone")]
    return versions


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
        "external": collected.external,
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
        summary["versions"] = software_versions(runs)
        (folder / "summary.json").write_text(json.dumps(json_safe(summary), indent=2, allow_nan=False))
        report = write_report(folder, dataset, split, per_case, dgg, failure, tests, notes, plots, pooled,
                              compute, evaluation_seconds)
    return report, per_case
