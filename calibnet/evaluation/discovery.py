"""Finding the trained runs of a dataset and split whose predictions can be evaluated."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from calibnet.errors import CalibnetError

_RUN_FOLDER = re.compile(r"(loco|scanner)_fold(\d+)_seed(\d+)")


@dataclass(frozen=True)
class Run:
    folder: Path
    record: dict  # calibnet_run.json

    @property
    def method(self) -> str:
        return self.record["spec"]["method"]

    @property
    def fold(self) -> int:
        return int(self.record["spec"]["fold"])

    @property
    def seed(self) -> int:
        return int(self.record["spec"]["seed"])

    @property
    def note(self) -> str:
        return self.record.get("note", "")

    @property
    def configuration(self) -> str:
        return self.record["spec"]["configuration"]

    @property
    def identity(self) -> dict:
        """What changes the model besides fold and seed: configuration, backbone, loss and network options."""
        backbone = self.record.get("backbone") or {}
        return {"configuration": self.configuration,
                **{f"backbone {k}": v for k, v in backbone.items() if v is not None},
                **({"target": self.record["target_label"]} if self.record.get("target_label") is not None else {}),
                **self.record.get("loss_options", {}),
                **{k: v for k, v in self.record.get("network_options", {}).items() if k != "seed"}}


def run_labels(runs: list) -> dict:
    """Row label of each run (by folder): the method name, qualified by what differs between runs of the same
    method ("nnunet (2d)", "nnunet (3d_fullres)"), so that different models are never pooled into one row."""
    labels = {}
    for method in {r.method for r in runs}:
        of_method = [r for r in runs if r.method == method]
        keys = sorted({k for r in of_method for k in r.identity})
        varying = [k for k in keys if len({repr(r.identity.get(k)) for r in of_method}) > 1]
        for run in of_method:
            parts = [str(run.identity.get(k)) if k in ("configuration", "backbone model") else f"{k}={run.identity.get(k)}"
                     for k in varying]
            labels[run.folder] = f"{method} ({', '.join(parts)})" if parts else method
    return labels


def discover_runs(results_root: Path, split: str, dataset_id: int | None = None, methods=None, folds=None,
                  seeds=None, configurations=None) -> tuple[str, list, list]:
    """(dataset name, runs with predictions, messages about runs whose predictions are missing)."""
    results_root = Path(results_root)
    datasets = sorted(p.name for p in results_root.glob("Dataset[0-9][0-9][0-9]_*")
                      if any(p.glob(f"*/{split}_fold*_seed*/calibnet_run.json")))
    if dataset_id is not None:
        datasets = [d for d in datasets if d.startswith(f"Dataset{int(dataset_id):03d}_")]
    if not datasets:
        where = f"dataset {dataset_id}" if dataset_id is not None else "any dataset"
        raise CalibnetError(f"no trained {split} runs for {where} in {results_root}; train with "
                            f"calib_train ... --split {split} first.")
    if len(datasets) > 1:
        raise CalibnetError(f"several datasets have {split} results ({', '.join(datasets)}); choose one with -d.")
    dataset = datasets[0]
    runs, missing = [], []
    for record_path in sorted((results_root / dataset).glob(f"*/{split}_fold*_seed*/calibnet_run.json")):
        run = Run(record_path.parent, json.loads(record_path.read_text()))
        if methods and run.method not in methods or folds and run.fold not in folds or seeds and run.seed not in seeds \
                or configurations and run.configuration not in configurations:
            continue
        absent = [r for r in ("val", "test") if not (run.folder / "predictions" / r / "confidence.json").is_file()]
        if absent:
            missing.append(f"{run.method} {split} fold {run.fold} seed {run.seed}: no {' and '.join(absent)} "
                           f"predictions (run calib_train ... --predict-only)")
            continue
        runs.append(run)
    if methods:
        found = {r.method for r in runs}
        missing += [f"{m}: no {split} run with predictions" for m in methods if m not in found]
    if not runs:
        raise CalibnetError(f"no {split} run of {dataset} has predictions to evaluate: " + "; ".join(missing))
    return dataset, runs, missing
