"""calib_plan_and_preprocess as a library call: check the raw dataset, fingerprint it with nnU-Net,
plan with :class:`CalibPlanner`, preprocess, and write the domain splits."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from calibnet.errors import CalibnetError
from calibnet.planners.calib_planner import CalibPlanner
from calibnet.raw_dataset_checks import check_raw_dataset
from calibnet.planners.splits import (CALIB_SPLITS_FILENAME, DEFAULT_SPLIT_SEED, DEFAULT_VAL_FRACTION,
                                      build_calib_splits, write_calib_splits)
from calibnet.runs import CALIB_PLANS_NAME

CONFIGURATIONS = ("2d", "3d_fullres", "3d_lowres")


@dataclass
class PlanningResult:
    dataset_name: str
    plans_file: Path
    splits_file: Path
    plans: dict
    splits: dict
    preprocessed_configurations: list = field(default_factory=list)
    warnings: list = field(default_factory=list)


def find_raw_dataset(raw_root: Path, dataset_id: int) -> Path:
    """The raw folder of ``dataset_id``; a clear error lists the datasets that do exist."""
    matches = sorted(p for p in Path(raw_root).glob(f"Dataset{int(dataset_id):03d}_*") if p.is_dir())
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise CalibnetError(f"dataset id {dataset_id} is ambiguous in {raw_root}: "
                            f"{', '.join(p.name for p in matches)}; keep one.")
    existing = sorted(p.name for p in Path(raw_root).glob("Dataset[0-9][0-9][0-9]_*") if p.is_dir())
    hint = f"available: {', '.join(existing)}" if existing else "it is empty"
    raise CalibnetError(f"no dataset with id {dataset_id} in {raw_root} ({hint}); "
                        f"create one with calib_convert.")


def _verify_with_nnunet(folder: Path, num_processes: int) -> None:
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
    try:
        verify_dataset_integrity(str(folder), num_processes)
    except (RuntimeError, AssertionError, FileNotFoundError) as e:
        message = " ".join(str(e).split())
        raise CalibnetError(f"nnU-Net's integrity check rejected {folder}: {message}") from None


def plan_and_preprocess(dataset_id: int, raw_root: Path, preprocessed_root: Path,
                        configurations: Sequence[str] = ("2d", "3d_fullres"), num_processes: int = 2,
                        patch_size: Sequence[int] | None = None, gpu_memory_target_gb: float = 8,
                        split_seed: int = DEFAULT_SPLIT_SEED, val_fraction: float = DEFAULT_VAL_FRACTION,
                        preprocess: bool = True, log: Callable[[str], None] = print) -> PlanningResult:
    """Validate, fingerprint, plan (``CalibPlans``), write ``calib_splits.json`` and preprocess.

    Every check on the raw data, including the splits' feasibility, runs before anything is written.
    """
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprint_dataset,
                                                                      preprocess_dataset)
    unknown = [c for c in configurations if c not in CONFIGURATIONS]
    if unknown:
        raise CalibnetError(f"unknown configuration {unknown[0]}; choose from {', '.join(CONFIGURATIONS)}.")
    folder = find_raw_dataset(raw_root, dataset_id)
    log(f"checking {folder}")
    raw = check_raw_dataset(folder, num_processes)
    splits = build_calib_splits(raw.domains, split_seed, val_fraction)
    warnings = []
    if "skipped" in splits["scanner"]:
        warnings.append(f"scanner split skipped: {splits['scanner']['skipped']}")
    warnings += [f"{family} fold left out: {reason}" for family in ("loco", "scanner")
                 for reason in splits[family].get("left_out", [])]
    _verify_with_nnunet(folder, num_processes)

    extract_fingerprint_dataset(int(dataset_id), num_processes=num_processes, check_dataset_integrity=False,
                                clean=True, verbose=False)
    planner = CalibPlanner(int(dataset_id), gpu_memory_target_in_gb=gpu_memory_target_gb, patch_size=patch_size)
    plans = planner.plan_experiment()
    preprocessed_folder = Path(preprocessed_root) / folder.name
    kept = write_calib_splits(splits, preprocessed_folder)
    if kept:
        warnings.append(kept)

    done = []
    if preprocess:
        selected = [c for c in configurations if c in plans["configurations"]]
        for c in configurations:
            if c not in selected:
                warnings.append(f"configuration {c} was not planned for this dataset (nnU-Net plans 3d_lowres only "
                                f"for images much larger than the patch); skipped")
        preprocess_dataset(int(dataset_id), CALIB_PLANS_NAME, selected, [num_processes] * len(selected),
                           verbose=False)
        done = selected
    return PlanningResult(dataset_name=folder.name, plans_file=preprocessed_folder / f"{CALIB_PLANS_NAME}.json",
                          splits_file=preprocessed_folder / CALIB_SPLITS_FILENAME, plans=plans, splits=splits,
                          preprocessed_configurations=done, warnings=warnings)
