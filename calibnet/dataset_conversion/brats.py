"""BraTS glioma segmentation (2021, 2023 GLI, 2024 GLI post-treatment).

Layouts as distributed:

- 2023 / 2024: ``BraTS-GLI-XXXXX-YYY/BraTS-GLI-XXXXX-YYY-{t1n,t1c,t2w,t2f,seg}.nii.gz`` (patient XXXXX,
  timepoint YYY); labels 1 NETC, 2 SNFH (edema), 3 ET, and in 2024 4 = resection cavity.
- 2021: ``BraTS2021_XXXXX/BraTS2021_XXXXX_{t1,t1ce,t2,flair,seg}.nii.gz``; labels 1 NCR, 2 ED, 4 ET.

Labels are written in nnU-Net's BraTS convention (1 edema, 2 non-enhancing core, 3 enhancing, 4 resection
cavity) with regions whole tumour ⊃ tumour core ⊃ enhancing tumour. BraTS ships no center metadata:
``--centers`` takes the FeTS ``partitioning_1.csv`` (``Partition_ID,Subject_ID``, subjects
``FeTS2022_XXXXX``) or a generic ``case,center[,vendor]`` CSV, matched on the 5-digit patient number.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from calibnet.dataset_conversion.public_dataset import (SourceCase, SourceCases, locate_root, normalise_vendor,
                                                        read_metadata_csv)
from calibnet.errors import CalibnetError

CHANNELS = ["T1", "T1c", "T2", "FLAIR"]
_REGIONS = {"background": 0, "whole_tumor": [1, 2, 3], "tumor_core": [2, 3], "enhancing_tumor": [3]}


@dataclass(frozen=True)
class BratsRelease:
    case_pattern: str  # regex of a case folder; group 1 = patient number, group 2 = timepoint (if any)
    separator: str  # between case id and modality in file names
    modalities: tuple  # file suffixes for T1, T1c, T2, FLAIR
    label_map: dict  # source label -> nnU-Net BraTS convention


RELEASES = {
    2021: BratsRelease(r"BraTS2021_(\d{5})", "_", ("t1", "t1ce", "t2", "flair"), {0: 0, 1: 2, 2: 1, 4: 3}),
    2023: BratsRelease(r"BraTS-GLI-(\d{5})-(\d{3})", "-", ("t1n", "t1c", "t2w", "t2f"), {0: 0, 1: 2, 2: 1, 3: 3}),
    2024: BratsRelease(r"BraTS-GLI-(\d{5})-(\d{3})", "-", ("t1n", "t1c", "t2w", "t2f"),
                       {0: 0, 1: 2, 2: 1, 3: 3, 4: 4}),
}


def patient_number(identifier: str) -> str | None:
    """The 5-digit patient number in FeTS2022_XXXXX, BraTS-GLI-XXXXX-YYY or BraTS2021_XXXXX."""
    match = re.search(r"(?:FeTS2022_|BraTS-GLI-|BraTS2021_)(\d{5})", identifier)
    return match.group(1) if match else None


def read_site_csv(path: Path, value_column: str) -> dict:
    """case id or patient number -> value, from FeTS ``partitioning_1.csv`` or a ``case,<value>`` CSV."""
    table = read_metadata_csv(path, dtype=str, keep_default_na=False)
    columns = list(table.columns)
    if columns[:2] == ["Partition_ID", "Subject_ID"] and value_column == "center":
        keys, values = table["Subject_ID"], table["Partition_ID"].map(lambda p: f"inst{int(p):02d}")
    elif "case" in columns and value_column in columns:
        keys, values = table["case"], table[value_column]
        if value_column == "vendor":
            values = values.map(normalise_vendor)
    else:
        raise CalibnetError(f"{path} has columns {', '.join(columns)}; expected FeTS 'Partition_ID,Subject_ID' "
                            f"or 'case,{value_column}'.")
    mapping = {}
    for key, value in zip(keys.str.strip(), values.str.strip()):
        mapping[key] = value
        number = patient_number(key)
        if number:
            mapping[number] = value
    return mapping


def _lookup(mapping: dict, case_id: str, patient: str):
    return mapping.get(case_id, mapping.get(patient))


def find_brats(input_dir: Path, year: int, centers_csv: Path | None = None,
               vendors_csv: Path | None = None) -> SourceCases:
    """Read a BraTS training-data folder of ``year``."""
    if year not in RELEASES:
        raise CalibnetError(f"BraTS year {year} is not supported; choose from {', '.join(map(str, RELEASES))}.")
    release = RELEASES[year]
    pattern = re.compile(release.case_pattern)

    def is_root(folder: Path) -> bool:
        return any(p.is_dir() and pattern.fullmatch(p.name) for p in folder.iterdir())

    root = locate_root(input_dir, is_root, f"a BraTS {year} training-data folder (case folders like "
                                           f"{release.case_pattern.replace(chr(92) + 'd', 'N')})")
    centers = read_site_csv(centers_csv, "center") if centers_csv else None
    vendors = read_site_csv(vendors_csv, "vendor") if vendors_csv else {}
    cases, uncovered, notes = [], [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and pattern.fullmatch(p.name)):
        case_id = folder.name
        match = pattern.fullmatch(case_id)
        patient = match.group(1)
        images = tuple(folder / f"{case_id}{release.separator}{m}.nii.gz" for m in release.modalities)
        for path in images:
            if not path.is_file():
                raise CalibnetError(f"{path} is missing (BraTS {year} cases have {', '.join(release.modalities)}).")
        label = folder / f"{case_id}{release.separator}seg.nii.gz"
        if not label.is_file():
            raise CalibnetError(f"{label} is missing: is {root} the validation data? Only training data has labels.")
        if centers is not None:
            center = _lookup(centers, case_id, patient)
            if center is None:
                uncovered.append(case_id)
                continue
        else:
            center = "unknown"
        domain = {"center": center, "vendor": _lookup(vendors, case_id, patient) or "unknown", "patient": patient}
        if match.lastindex and match.lastindex >= 2:
            domain["timepoint"] = match.group(2)
        cases.append(SourceCase(case_id, images, label, domain))
    if uncovered:
        notes.append(f"{len(uncovered)} case(s) are not in {centers_csv.name} and were left out "
                     f"(first: {', '.join(uncovered[:3])})")
    if centers is None:
        notes.append("BraTS ships no center metadata: pass --centers partitioning_1.csv (FeTS) for "
                     "leave-one-center-out; every case has center 'unknown'")
    skipped = [p.name for p in root.iterdir() if p.is_dir() and not pattern.fullmatch(p.name)]
    if skipped:
        notes.append(f"ignored {len(skipped)} folder(s) that are not BraTS {year} cases (first: {skipped[0]})")
    labels = dict(_REGIONS)
    order = [1, 2, 3]
    if 4 in release.label_map:
        labels["resection_cavity"] = [4]
        order.append(4)
    return SourceCases(dataset=f"BraTS {year}", cases=cases, channel_names=CHANNELS, labels=labels,
                       label_map=release.label_map, regions_class_order=order, notes=notes)

