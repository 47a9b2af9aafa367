"""IBSR 18 (brain tissue, 18 T1 scans from one 1.5 T site): ``IBSR_NN/IBSR_NN_ana_strip.nii.gz`` and
``IBSR_NN_segTRI_fill_ana.nii.gz``, stored 4-D with a trailing singleton axis; labels 1 CSF, 2 GM,
3 WM. A single center: useful for legacy-data evaluation, not for leave-one-center-out."""
from __future__ import annotations

import re
from pathlib import Path

from calibnet.dataset_conversion.public_dataset import SourceCase, SourceCases, locate_root
from calibnet.errors import CalibnetError

_CASE = re.compile(r"IBSR_\d{2}")


def find_ibsr18(input_dir: Path) -> SourceCases:
    """Read the folder holding ``IBSR_01`` … ``IBSR_18`` (or its parent)."""
    root = locate_root(input_dir, lambda f: any(p.is_dir() and _CASE.fullmatch(p.name) for p in f.iterdir()),
                       "the IBSR 18 folder (IBSR_01 … IBSR_18)")
    cases = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and _CASE.fullmatch(p.name)):
        image = folder / f"{folder.name}_ana_strip.nii.gz"
        label = folder / f"{folder.name}_segTRI_fill_ana.nii.gz"
        for path in (image, label):
            if not path.is_file():
                raise CalibnetError(f"{path} is missing (each IBSR case has _ana_strip and _segTRI_fill_ana).")
        cases.append(SourceCase(folder.name, (image,), label,
                                {"center": "IBSR", "vendor": "unknown", "field_strength": "1.5"}))
    return SourceCases(dataset="IBSR 18", cases=cases, channel_names=["T1"],
                       labels={"background": 0, "CSF": 1, "GM": 2, "WM": 3}, label_map={0: 0, 1: 1, 2: 2, 3: 3})
