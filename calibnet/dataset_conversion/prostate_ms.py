"""Multi-site prostate T2 MRI (Liu et al. 2020, SAML/MS-Net release): one folder per site with
``CaseNN.nii.gz`` and ``CaseNN_segmentation.nii.gz`` (BMC writes ``_Segmentation``, capital S). Case
numbers have gaps. Some masks carry 2 where 1 is meant; it is mapped to 1 and reported."""
from __future__ import annotations

import re
from pathlib import Path

from calibnet.dataset_conversion.public_dataset import SourceCase, SourceCases, locate_root
from calibnet.errors import CalibnetError

# site folder -> (center, vendor, field strength in T or "" where the publication gives none)
SITES = {
    "ISBI": ("RUNMC", "Siemens", "3"),
    "ISBI_1.5": ("BMC", "Philips", "1.5"),
    "I2CVB": ("HCRUDB", "Siemens", "3"),
    "UCL": ("UCL", "Siemens", ""),
    "BIDMC": ("BIDMC", "GE", "3"),
    "HK": ("HK", "Siemens", "1.5"),
}
_IMAGE = re.compile(r"Case(\d+)\.nii\.gz")


def find_prostate_ms(input_dir: Path) -> SourceCases:
    """Read the folder holding the site folders (ISBI, ISBI_1.5, I2CVB, UCL, BIDMC, HK) or its parent."""
    root = locate_root(input_dir, lambda f: any((f / site).is_dir() for site in SITES),
                       f"the multi-site prostate folder (site folders {', '.join(SITES)})")
    cases, notes = [], []
    for site, (center, vendor, field_strength) in SITES.items():
        folder = root / site
        if not folder.is_dir():
            notes.append(f"site folder {site} ({center}) is absent")
            continue
        for image in sorted(p for p in folder.iterdir() if _IMAGE.fullmatch(p.name)):
            stem = image.name[:-len(".nii.gz")]
            masks = [folder / f"{stem}_segmentation.nii.gz", folder / f"{stem}_Segmentation.nii.gz"]
            mask = next((m for m in masks if m.is_file()), None)
            if mask is None:
                raise CalibnetError(f"{masks[0]} is missing (every {site} case needs its segmentation).")
            cases.append(SourceCase(f"{center}_{stem}", (image,), mask,
                                    {"center": center, "vendor": vendor, "field_strength": field_strength,
                                     "site_folder": site}))
    return SourceCases(dataset="multi-site prostate", cases=cases, channel_names=["T2"],
                       labels={"background": 0, "prostate": 1}, label_map={0: 0, 1: 1, 2: 1},
                       reported_label_values=(2,), notes=notes)
