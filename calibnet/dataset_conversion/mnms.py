"""M&Ms-1 and M&Ms-2 cardiac cine MRI (labels 1 LV, 2 MYO, 3 RV), with vendor and center metadata.

M&Ms-1 (``OpenDataset/``): ``211230_M&Ms_Dataset_information_diagnosis_opendataset.csv`` (``External code``,
``VendorName``, ``Vendor``, ``Centre``, ``ED``, ``ES``) and ``Training/Labeled/<ID>/<ID>_sa.nii.gz`` (4-D cine)
with ``<ID>_sa_gt.nii.gz``; ``Validation/<ID>`` and ``Testing/<ID>`` are read too when present. The
end-diastolic and end-systolic frames become two cases of one patient. The CSV's ED/ES indices sometimes
disagree with the frames that carry ground truth: the annotated frames are used and the disagreement
reported.

M&Ms-2 (``MnM2/``): ``dataset_information.csv`` (``SUBJECT_CODE``, ``DISEASE``, ``VENDOR``, ``SCANNER``,
``FIELD``) and ``dataset/NNN/NNN_SA_{ED,ES}.nii.gz`` with ``_gt``. M&Ms-2 publishes no center column, so
the scanner model stands in for the center (leave-one-center-out becomes leave-one-scanner-model-out).
"""
from __future__ import annotations

from pathlib import Path

import SimpleITK as sitk

from calibnet.dataset_conversion.public_dataset import (SourceCase, SourceCases, locate_root, normalise_vendor,
                                                        read_metadata_csv, require_columns)
from calibnet.errors import CalibnetError

CARDIAC_LABELS = {"background": 0, "LV": 1, "MYO": 2, "RV": 3}
CARDIAC_LABEL_MAP = {0: 0, 1: 1, 2: 2, 3: 3}
MNMS_CSV_GLOB = "*M&Ms_Dataset_information*.csv"
MNMS_SPLIT_FOLDERS = ("Training/Labeled", "Validation", "Testing")


def annotated_frames(gt_path: Path) -> tuple[list, dict]:
    """Frames of a 4-D ground truth that carry labels, and each one's LV voxel count."""
    try:
        gt = sitk.GetArrayFromImage(sitk.ReadImage(str(gt_path)))  # (t, z, y, x)
    except RuntimeError:
        raise CalibnetError(f"{gt_path} cannot be read as an image.") from None
    if gt.ndim != 4:
        raise CalibnetError(f"{gt_path} is {gt.ndim}-D; M&Ms-1 ground truth is a 4-D cine volume.")
    frames = [t for t in range(gt.shape[0]) if gt[t].any()]
    return frames, {t: int((gt[t] == 1).sum()) for t in frames}


def choose_ed_es(case: str, csv_ed: int, csv_es: int, frames: list, lv_voxels: dict, gt_path: Path):
    """(ED, ES, note): the CSV's frames when they are the annotated ones, else the annotated frames
    with ED = the larger left ventricle, and a note saying so."""
    if sorted(frames) == sorted({csv_ed, csv_es}) and csv_ed != csv_es:
        return csv_ed, csv_es, None
    if len(frames) != 2:
        raise CalibnetError(f"{gt_path} has ground truth in {len(frames)} frame(s) {frames}; expected ED and ES.")
    ed, es = sorted(frames, key=lambda t: -lv_voxels[t])
    return ed, es, f"{case}: CSV says ED={csv_ed}, ES={csv_es}, ground truth is in frames {sorted(frames)}; used ED={ed}, ES={es}"


def find_mnms(input_dir: Path) -> SourceCases:
    """Read the unpacked M&Ms-1 ``OpenDataset`` folder (or its parent)."""
    root = locate_root(input_dir, lambda f: any(f.glob(MNMS_CSV_GLOB)) and (f / "Training").is_dir(),
                       "the M&Ms-1 OpenDataset folder (with the dataset-information CSV and Training/)")
    csv_path = sorted(root.glob(MNMS_CSV_GLOB))[0]
    table = read_metadata_csv(csv_path, dtype=str, keep_default_na=False)
    require_columns(table, ("External code", "VendorName", "Vendor", "Centre", "ED", "ES"), csv_path)
    info = {row["External code"].strip(): row for _, row in table.iterrows()}
    cases, notes, disagreements, missing_rows = [], [], [], []
    for split in MNMS_SPLIT_FOLDERS:
        folder = root / split
        if not folder.is_dir():
            continue
        for case_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
            code = case_dir.name
            image, gt = case_dir / f"{code}_sa.nii.gz", case_dir / f"{code}_sa_gt.nii.gz"
            if not image.is_file():
                raise CalibnetError(f"{image} is missing (each M&Ms case folder holds <ID>_sa.nii.gz).")
            if not gt.is_file():
                if split == "Training/Labeled":
                    raise CalibnetError(f"{gt} is missing (Training/Labeled cases have <ID>_sa_gt.nii.gz).")
                continue
            if code not in info:
                missing_rows.append(code)
                continue
            row = info[code]
            frames, lv = annotated_frames(gt)
            ed, es, note = choose_ed_es(code, int(row["ED"]), int(row["ES"]), frames, lv, gt)
            if note:
                disagreements.append(note)
            common = {"center": f"Centre{row['Centre'].strip()}", "vendor": normalise_vendor(row["VendorName"]),
                      "vendor_code": row["Vendor"].strip(), "patient": code, "source_split": split.split("/")[0]}
            for phase, frame in (("ED", ed), ("ES", es)):
                cases.append(SourceCase(f"{code}_{phase}", (image,), gt, {**common, "phase": phase}, frame=frame))
    if (root / "Training" / "Unlabeled").is_dir():
        notes.append("Training/Unlabeled has no ground truth and was skipped")
    if missing_rows:
        notes.append(f"{len(missing_rows)} case folder(s) have no row in {csv_path.name} and were left out "
                     f"(first: {missing_rows[0]})")
    if disagreements:
        notes.append(f"{len(disagreements)} case(s) had ED/ES indices in the CSV that differ from the annotated "
                     f"frames; the annotated frames were used: " + "; ".join(disagreements[:3]))
    return SourceCases(dataset="M&Ms-1", cases=cases, channel_names=["cineMRI"], labels=CARDIAC_LABELS,
                       label_map=CARDIAC_LABEL_MAP, notes=notes)


def find_mnms2(input_dir: Path) -> SourceCases:
    """Read the unpacked M&Ms-2 ``MnM2`` folder (or its parent)."""
    root = locate_root(input_dir, lambda f: (f / "dataset_information.csv").is_file() and (f / "dataset").is_dir(),
                       "the M&Ms-2 MnM2 folder (dataset_information.csv and dataset/)")
    csv_path = root / "dataset_information.csv"
    table = read_metadata_csv(csv_path, dtype=str, keep_default_na=False)
    require_columns(table, ("SUBJECT_CODE", "DISEASE", "VENDOR", "SCANNER", "FIELD"), csv_path)
    cases, missing = [], []
    for _, row in table.iterrows():
        try:
            code = f"{int(row['SUBJECT_CODE']):03d}"
        except ValueError:
            raise CalibnetError(f"{csv_path}: SUBJECT_CODE {row['SUBJECT_CODE']!r} is not an integer.") from None
        folder = root / "dataset" / code
        if not folder.is_dir():
            missing.append(code)
            continue
        scanner = row["SCANNER"].strip()
        common = {"center": scanner or "unknown", "vendor": normalise_vendor(row["VENDOR"]), "scanner": scanner,
                  "field_strength": row["FIELD"].strip(), "disease": row["DISEASE"].strip(), "patient": code}
        for phase in ("ED", "ES"):
            image, gt = folder / f"{code}_SA_{phase}.nii.gz", folder / f"{code}_SA_{phase}_gt.nii.gz"
            for path in (image, gt):
                if not path.is_file():
                    raise CalibnetError(f"{path} is missing (each M&Ms-2 subject has SA_ED, SA_ES and their _gt).")
            cases.append(SourceCase(f"{code}_{phase}", (image,), gt, {**common, "phase": phase}))
    notes = ["M&Ms-2 publishes no center: the scanner model is used as the center"]
    if missing:
        notes.append(f"{len(missing)} subject(s) listed in {csv_path.name} have no folder in dataset/ "
                     f"(first: {missing[0]}) and were left out")
    listed = {f"{int(c):03d}" for c in table["SUBJECT_CODE"]}
    unlisted = sorted(p.name for p in (root / "dataset").iterdir() if p.is_dir() and p.name not in listed)
    if unlisted:
        notes.append(f"{len(unlisted)} folder(s) in dataset/ are not in {csv_path.name} and were left out "
                     f"(first: {unlisted[0]})")
    return SourceCases(dataset="M&Ms-2", cases=cases, channel_names=["cineMRI"], labels=CARDIAC_LABELS,
                       label_map=CARDIAC_LABEL_MAP, notes=notes)
