"""Domain-shift splits (DESIGN §5), written to ``calib_splits.json`` next to nnU-Net's plans.

Two families:

- ``loco`` (leave one center out): one fold per center, centers in sorted order; the held-out
  center's cases are the test set, the other centers give train and val.
- ``scanner``: one fold per source vendor, vendors by descending case count (fold 0 = largest);
  the source vendor gives train and val, every case of the other known vendors is the test set.

Val is the in-domain held-out set (≈ ``val_fraction`` of each source center, seeded); it picks
checkpoints and is the "source" side of the domain generalisation gap. When ``domains.csv`` has a
``patient`` column, all cases of one patient land on the same side of every split.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

from calibnet.domains import UNKNOWN_VENDOR
from calibnet.errors import CalibnetError
from calibnet.files import atomic_write_json

CALIB_SPLITS_FILENAME = "calib_splits.json"
NNUNET_SPLITS_FILENAME = "splits_final.json"
SPLIT_FAMILIES = ("loco", "scanner")
DEFAULT_VAL_FRACTION = 0.2
DEFAULT_SPLIT_SEED = 12345


def _groups(cases: pd.DataFrame) -> pd.Series:
    """The unit that must not be split: the patient when known, else the case."""
    if "patient" in cases.columns:
        return cases["patient"].where(cases["patient"] != "", cases["case_id"])
    return cases["case_id"]


def split_source_cases(source: pd.DataFrame, val_fraction: float, rng: np.random.Generator) -> tuple[list, list]:
    """Train/val split of the source-domain cases, stratified by center and grouped by patient.

    Each center with at least two groups contributes ``round(val_fraction × groups)`` groups to val,
    at least one and never all of them.
    """
    groups = _groups(source)
    val_groups = set()
    for _, center_cases in source.groupby("center", sort=True):
        center_groups = sorted(set(groups[center_cases.index]))
        if len(center_groups) < 2:
            continue
        n_val = min(max(1, int(round(val_fraction * len(center_groups)))), len(center_groups) - 1)
        val_groups.update(rng.permutation(center_groups)[:n_val].tolist())
    if not val_groups and groups.nunique() >= 2:
        # every source center has a single group: take one group from the whole source domain
        val_groups.add(rng.permutation(sorted(set(groups)))[0])
    in_val = groups.isin(val_groups)
    return sorted(source.loc[~in_val, "case_id"]), sorted(source.loc[in_val, "case_id"])


def build_loco_folds(domains: pd.DataFrame, seed: int = DEFAULT_SPLIT_SEED,
                     val_fraction: float = DEFAULT_VAL_FRACTION) -> list[dict]:
    """One fold per center (sorted): that center is the test set."""
    centers = sorted(domains["center"].unique())
    if len(centers) < 2:
        raise CalibnetError(
            f"leave-one-center-out needs at least 2 centers, but every case is from center "
            f"{centers[0] if centers else '(none)'}; check the 'center' column of domains.csv.")
    folds = []
    for fold, center in enumerate(centers):
        held_out = domains["center"] == center
        train, val = split_source_cases(domains[~held_out], val_fraction, np.random.default_rng([seed, 0, fold]))
        folds.append({"fold": fold, "held_out": {"center": center}, "train": train, "val": val,
                      "test": sorted(domains.loc[held_out, "case_id"])})
    return folds


def vendor_order(domains: pd.DataFrame) -> list[str]:
    """Known vendors by descending number of cases, ties by name."""
    counts = domains.loc[domains["vendor"] != UNKNOWN_VENDOR, "vendor"].value_counts()
    return sorted(counts.index, key=lambda v: (-counts[v], v))


def build_scanner_folds(domains: pd.DataFrame, seed: int = DEFAULT_SPLIT_SEED,
                        val_fraction: float = DEFAULT_VAL_FRACTION) -> tuple[list[dict], str | None]:
    """One fold per known vendor, largest first. Returns ``(folds, reason)``; with fewer than two known
    vendors the folds are empty and ``reason`` says why."""
    vendors = vendor_order(domains)
    if len(vendors) < 2:
        found = vendors[0] if vendors else "none known"
        return [], (f"the scanner split needs at least 2 known vendors, found {found}; "
                    f"fill the 'vendor' column of domains.csv to enable it")
    known = domains[domains["vendor"] != UNKNOWN_VENDOR]
    folds = []
    for fold, vendor in enumerate(vendors):
        is_source = known["vendor"] == vendor
        train, val = split_source_cases(known[is_source], val_fraction, np.random.default_rng([seed, 1, fold]))
        folds.append({"fold": fold, "source": {"vendor": vendor},
                      "targets": [v for v in vendors if v != vendor],
                      "train": train, "val": val, "test": sorted(known.loc[~is_source, "case_id"])})
    return folds, None


def build_calib_splits(domains: pd.DataFrame, seed: int = DEFAULT_SPLIT_SEED,
                       val_fraction: float = DEFAULT_VAL_FRACTION) -> dict:
    """Both split families as the content of ``calib_splits.json``."""
    if not 0 < val_fraction < 1:
        raise CalibnetError(f"--val-fraction must be between 0 and 1, not {val_fraction}.")
    scanner_folds, scanner_skipped = build_scanner_folds(domains, seed, val_fraction)
    splits = {
        "loco": {"folds": build_loco_folds(domains, seed, val_fraction)},
        "scanner": {"folds": scanner_folds},
        "seed": seed,
        "val_fraction": val_fraction,
    }
    if scanner_skipped:
        splits["scanner"]["skipped"] = scanner_skipped
    for family in SPLIT_FAMILIES:
        usable, left_out = _trainable_folds(family, splits[family]["folds"])
        if left_out:
            splits[family]["folds"], splits[family]["left_out"] = usable, left_out
            if not usable:
                raise CalibnetError(f"no {family} fold can be trained: {'; '.join(left_out)}.")
    return splits


def _empty_part(fold: dict) -> str | None:
    """"train" or "val" when that part of the fold is empty, else None."""
    return next((part for part in ("train", "val") if not fold.get(part)), None)


def _trainable_folds(family: str, folds: list) -> tuple[list, list]:
    """(folds with a train and a val set, renumbered in order; a message for each fold left out). A source domain of
    a single case (or patient) has nothing to validate on."""
    usable, left_out = [], []
    for fold in folds:
        empty = _empty_part(fold)
        if empty is None:
            usable.append({**fold, "fold": len(usable)})
        else:
            what = f"holding out center {fold['held_out']['center']}" if family == "loco" \
                else f"training on vendor {fold['source']['vendor']}"
            left_out.append(f"the fold {what} would have an empty {empty} set ({len(fold['train'])} train, "
                            f"{len(fold['val'])} val case(s)); its cases stay in the other folds")
    return usable, left_out


def nnunet_splits_from_loco(splits: dict) -> list[dict]:
    """nnU-Net's ``splits_final.json`` content: the loco folds' train/val, so plain nnU-Net tooling works."""
    return [{"train": f["train"], "val": f["val"]} for f in splits["loco"]["folds"]]


def _written_by_calibnet(splits_final: Path, calib_splits: Path) -> bool:
    """Whether ``splits_final.json`` holds the loco folds of the ``calib_splits.json`` beside it, i.e. calibnet
    wrote it (and may replace it); a file the user or nnU-Net wrote never matches."""
    try:
        existing = json.loads(splits_final.read_text())
        previous = json.loads(calib_splits.read_text())
        return existing == nnunet_splits_from_loco(previous)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def write_calib_splits(splits: dict, preprocessed_dataset_folder: os.PathLike) -> str | None:
    """Write ``calib_splits.json`` and, unless the user already has their own, nnU-Net's ``splits_final.json``
    (the loco folds), atomically. An existing ``splits_final.json`` that calibnet did not write is left
    byte-identical: plain ``nnUNetv2_train`` keeps training on the user's folds. Returns a note when it was kept."""
    folder = Path(preprocessed_dataset_folder)
    splits_final = folder / NNUNET_SPLITS_FILENAME
    kept = None
    if splits_final.exists() and not _written_by_calibnet(splits_final, folder / CALIB_SPLITS_FILENAME):
        kept = (f"{splits_final} is not calibnet's: left as it is (nnU-Net's own commands, e.g. nnUNetv2_train, "
                f"keep training on its folds; calibnet trains from {CALIB_SPLITS_FILENAME}). Delete it and plan "
                f"again to get the leave-one-center-out folds there.")
    else:
        atomic_write_json(splits_final, nnunet_splits_from_loco(splits))
    atomic_write_json(folder / CALIB_SPLITS_FILENAME, splits)
    return kept


def describe_fold(family: str, fold: dict) -> str:
    """E.g. ``fold 0 holds out center C1`` or ``fold 1 trains on vendor GE``."""
    if family == "loco":
        return f"fold {fold['fold']} holds out center {fold['held_out']['center']}"
    return f"fold {fold['fold']} trains on vendor {fold['source']['vendor']}"


def get_fold(splits: dict, family: str, fold: int, where: os.PathLike = CALIB_SPLITS_FILENAME) -> dict:
    """The fold entry, or a :class:`CalibnetError` listing the valid folds — never a silent fallback."""
    if family not in SPLIT_FAMILIES:
        raise CalibnetError(f"unknown split {family!r}; choose {' or '.join(SPLIT_FAMILIES)}.")
    folds = splits.get(family, {}).get("folds", [])
    if not folds:
        reason = splits.get(family, {}).get("skipped", "it has no folds")
        raise CalibnetError(f"{where}: the {family} split is not available: {reason}.")
    if not isinstance(fold, (int, np.integer)) or not 0 <= fold < len(folds):
        valid = "; ".join(describe_fold(family, f) for f in folds)
        raise CalibnetError(f"{where}: fold {fold!r} does not exist in the {family} split. Valid folds: {valid}.")
    empty = _empty_part(folds[fold])
    if empty is not None:
        raise CalibnetError(f"{where}: {family} {describe_fold(family, folds[fold])} has an empty {empty} set and "
                            f"cannot be trained or evaluated; run calib_plan_and_preprocess again (it leaves such "
                            f"folds out).")
    return folds[fold]


def load_calib_splits(preprocessed_dataset_folder: os.PathLike) -> dict:
    """Read ``calib_splits.json``; a missing file says which command writes it."""
    path = Path(preprocessed_dataset_folder) / CALIB_SPLITS_FILENAME
    if not path.is_file():
        raise CalibnetError(f"{path} is missing; run calib_plan_and_preprocess for this dataset first.")
    return json.loads(path.read_text())
