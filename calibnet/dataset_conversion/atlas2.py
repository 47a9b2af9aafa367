"""ATLAS v2.0 (stroke lesions on T1w, 33 cohorts) in its BIDS layout:

``ATLAS_2/Training/RNNN/sub-rNNNsMMM/ses-1/anat/sub-rNNNsMMM_ses-1_space-MNI152NLin2009aSym_T1w.nii.gz``
with ``..._label-L_desc-T1lesion_mask.nii.gz`` beside it. The cohort ``RNNN`` is the center.
``Testing/`` has no masks and is skipped. Scanner metadata is read from the top-level
``*SupplementaryInfo.csv`` or ``*MetaData.xlsx`` (column ``Subject ID``) when it has such columns.
"""
from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from calibnet.dataset_conversion.public_dataset import (SourceCase, SourceCases, locate_root, normalise_vendor,
                                                        read_metadata_csv)
from calibnet.errors import CalibnetError

T1_SUFFIX = "_ses-1_space-MNI152NLin2009aSym_T1w.nii.gz"
MASK_SUFFIX = "_ses-1_space-MNI152NLin2009aSym_label-L_desc-T1lesion_mask.nii.gz"
_SUBJECT = re.compile(r"sub-(r\d{3}s\d{3})")
_COHORT = re.compile(r"R\d{3}")
# domains.csv column -> patterns of metadata column names that may hold it
_METADATA_COLUMNS = {"vendor": ("vendor", "manufacturer"), "scanner": ("model", "scanner"),
                     "field_strength": ("field strength", "field_strength", "tesla", "field")}


def _read_metadata(root: Path) -> tuple[dict, str | None]:
    """subject (e.g. r001s001) -> {vendor, scanner, field_strength}, and the file it came from."""
    files = sorted(root.glob("*SupplementaryInfo.csv")) + sorted(root.glob("*MetaData.xlsx"))
    for path in files:
        if path.suffix == ".csv":
            table = read_metadata_csv(path, dtype=str, keep_default_na=False)
        else:
            try:
                table = pd.read_excel(path, dtype=str).fillna("")
            except Exception as e:  # openpyxl raises many types for damaged files
                raise CalibnetError(f"{path} cannot be read as an Excel file ({e}).") from None
            table.columns = [str(c).strip() for c in table.columns]
        if "Subject ID" not in table.columns:
            continue
        found = {}
        for target, patterns in _METADATA_COLUMNS.items():
            column = next((c for p in patterns for c in table.columns
                           if p in c.lower() and c not in found.values()), None)
            if column:
                found[target] = column
        if not found:
            continue
        metadata = {}
        for _, row in table.iterrows():
            match = re.search(r"r\d{3}s\d{3}", str(row["Subject ID"]).lower())
            if match:
                metadata[match.group(0)] = {k: str(row[c]).strip() for k, c in found.items()}
        return metadata, path.name
    return {}, None


def find_atlas2(input_dir: Path) -> SourceCases:
    """Read an unpacked ATLAS v2.0 release (the ``ATLAS_2`` folder or its parent)."""
    root = locate_root(input_dir, lambda f: (f / "Training").is_dir() and any(
        _COHORT.fullmatch(p.name) for p in (f / "Training").iterdir()), "an ATLAS v2.0 release (ATLAS_2/Training/RNNN)")
    metadata, metadata_file = _read_metadata(root)
    cases, notes = [], []
    for cohort in sorted(p for p in (root / "Training").iterdir() if p.is_dir() and _COHORT.fullmatch(p.name)):
        for subject_dir in sorted(p for p in cohort.iterdir() if p.is_dir() and _SUBJECT.fullmatch(p.name)):
            anat = subject_dir / "ses-1" / "anat"
            image = anat / f"{subject_dir.name}{T1_SUFFIX}"
            mask = anat / f"{subject_dir.name}{MASK_SUFFIX}"
            for path in (image, mask):
                if not path.is_file():
                    raise CalibnetError(f"{path} is missing (each ATLAS training subject has a T1w image and a "
                                        f"lesion mask in ses-1/anat).")
            subject = _SUBJECT.fullmatch(subject_dir.name).group(1)
            info = metadata.get(subject, {})
            domain = {"center": cohort.name, "vendor": normalise_vendor(info.get("vendor")),
                      "scanner": info.get("scanner", ""), "field_strength": info.get("field_strength", "")}
            cases.append(SourceCase(subject_dir.name, (image,), mask, domain))
    if (root / "Testing").is_dir():
        notes.append("Testing/ has no lesion masks and was skipped")
    notes.append(f"scanner metadata read from {metadata_file}" if metadata_file
                 else "no metadata file with vendor/scanner columns found; vendor is 'unknown'")
    return SourceCases(dataset="ATLAS v2.0", cases=cases, channel_names=["T1"],
                       labels={"background": 0, "lesion": 1}, label_map={0: 0, 1: 1}, notes=notes)
