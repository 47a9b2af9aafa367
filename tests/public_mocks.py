"""Tiny mock trees in the exact layouts the publishers distribute (real file names, CSV headers and
quirks), with small random volumes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

SHAPE = (8, 12, 10)  # (z, y, x)


def write_volume(path: Path, array: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> None:
    """Write a 3-D (z, y, x) or 4-D (t, z, y, x) array as NIfTI."""
    path.parent.mkdir(parents=True, exist_ok=True)
    volumes = [sitk.GetImageFromArray(a) for a in (array if array.ndim == 4 else [array])]
    for volume in volumes:
        volume.SetSpacing(spacing)
    image = sitk.JoinSeries(volumes) if array.ndim == 4 else volumes[0]
    sitk.WriteImage(image, str(path))


def random_image(rng, shape=SHAPE) -> np.ndarray:
    return rng.uniform(10, 100, shape).astype(np.float32)


def label_with(rng, values, shape=SHAPE) -> np.ndarray:
    label = np.zeros(shape, dtype=np.uint8)
    flat = label.reshape(-1)
    for i, value in enumerate(values):
        flat[10 + 7 * i: 14 + 7 * i] = value
    return label


def make_brats(root: Path, year: int, rng) -> dict:
    """Five patients; 00002 has two timepoints (2023/2024). Returns the label values written per case."""
    labels = {2021: (1, 2, 4), 2023: (1, 2, 3), 2024: (1, 2, 3, 4)}[year]
    written = {}
    patients = [("00001", "000"), ("00002", "000"), ("00002", "001"), ("00003", "000"), ("00004", "000"),
                ("00005", "000")]
    for patient, timepoint in patients:
        if year == 2021:
            if timepoint != "000":
                continue
            case, sep, mods = f"BraTS2021_{patient}", "_", ("t1", "t1ce", "t2", "flair")
        else:
            case, sep, mods = f"BraTS-GLI-{patient}-{timepoint}", "-", ("t1n", "t1c", "t2w", "t2f")
        for mod in mods:
            write_volume(root / case / f"{case}{sep}{mod}.nii.gz", random_image(rng))
        written[case] = label_with(rng, labels)
        write_volume(root / case / f"{case}{sep}seg.nii.gz", written[case])
    return written


def write_fets_partitioning(path: Path) -> None:
    """FeTS partitioning_1.csv: exact header, CRLF line endings; patient 00005 is not covered."""
    rows = ["Partition_ID,Subject_ID", "1,FeTS2022_00001", "1,FeTS2022_00002", "2,FeTS2022_00003",
            "2,FeTS2022_00004", "3,FeTS2022_00999"]
    path.write_bytes(("\r\n".join(rows) + "\r\n").encode())


def make_atlas2(parent: Path, rng) -> Path:
    root = parent / "ATLAS_2"
    prefix = "_ses-1_space-MNI152NLin2009aSym_"
    for cohort, subjects in (("R001", ("r001s001", "r001s002")), ("R002", ("r002s001", "r002s003"))):
        for subject in subjects:
            anat = root / "Training" / cohort / f"sub-{subject}" / "ses-1" / "anat"
            write_volume(anat / f"sub-{subject}{prefix}T1w.nii.gz", random_image(rng))
            write_volume(anat / f"sub-{subject}{prefix}label-L_desc-T1lesion_mask.nii.gz", label_with(rng, (1,)))
    anat = root / "Testing" / "R001" / "sub-r001s100" / "ses-1" / "anat"
    write_volume(anat / f"sub-r001s100{prefix}T1w.nii.gz", random_image(rng))
    (root / "20211112_ATLAS_2.0_SupplementaryInfo.csv").write_text(
        "Subject ID,Cohort,Scanner Manufacturer,Scanner Model,Field Strength\n"
        "r001s001,R001,SIEMENS,Trio,3\nr001s002,R001,SIEMENS,Trio,3\nr002s001,R002,GE MEDICAL SYSTEMS,Signa,1.5\n")
    return root


def make_mnms(parent: Path, rng) -> Path:
    """Three labeled cases with 5-frame cines; case B1C2D3's CSV ED/ES disagree with its annotated frames."""
    root = parent / "OpenDataset"
    rows = ["External code,VendorName,Vendor,Centre,ED,ES,Pathology"]
    specs = [("A0S9V9", "Siemens", "A", 1, (0, 3), (0, 3)), ("B1C2D3", "Philips", "B", 2, (1, 3), (0, 3)),
             ("E4F5G6", "GE", "C", 3, (4, 2), (4, 2))]
    for code, vendor, letter, centre, csv_frames, true_frames in specs:
        rows.append(f"{code},{vendor},{letter},{centre},{csv_frames[0]},{csv_frames[1]},NOR")
        case = root / "Training" / "Labeled" / code
        write_volume(case / f"{code}_sa.nii.gz", rng.uniform(0, 50, (5, *SHAPE)).astype(np.float32))
        gt = np.zeros((5, *SHAPE), dtype=np.uint8)
        ed, es = true_frames
        gt[ed, 2:6, 2:8, 2:8] = 1  # large LV at end-diastole
        gt[es, 3:5, 3:6, 3:6] = 1
        gt[ed, 1, 1, 1:4] = 2
        gt[es, 1, 1, 1:4] = 3
        write_volume(case / f"{code}_sa_gt.nii.gz", gt)
    (root / "Training" / "Unlabeled" / "Z9Z9Z9").mkdir(parents=True)
    (root / "211230_M&Ms_Dataset_information_diagnosis_opendataset.csv").write_text("\n".join(rows) + "\n")
    return root


def make_mnms2(parent: Path, rng) -> Path:
    root = parent / "MnM2"
    rows = ["SUBJECT_CODE,DISEASE,VENDOR,SCANNER,FIELD", "1,NOR,SIEMENS,Avanto,1.5",
            "2,DLV,Philips Medical Systems,Achieva,1.5", "3,HCM,GE MEDICAL SYSTEMS,Signa Excite,1.5"]
    for code in ("001", "002", "003"):
        for phase in ("ED", "ES"):
            write_volume(root / "dataset" / code / f"{code}_SA_{phase}.nii.gz", random_image(rng))
            write_volume(root / "dataset" / code / f"{code}_SA_{phase}_gt.nii.gz", label_with(rng, (1, 2, 3)))
            write_volume(root / "dataset" / code / f"{code}_LA_{phase}.nii.gz", random_image(rng, (1, 12, 10)))
    (root / "dataset_information.csv").write_text("\n".join(rows) + "\n")
    return root


def make_prostate(parent: Path, rng) -> Path:
    """Three sites; BMC (ISBI_1.5) uses _Segmentation; numbering has gaps; one BIDMC mask uses 2 for prostate."""
    root = parent / "Processed_data_nii"
    for site, numbers, suffix in (("ISBI", (0, 1), "_segmentation"), ("ISBI_1.5", (0, 2), "_Segmentation"),
                                  ("BIDMC", (0, 3), "_segmentation")):
        for n in numbers:
            write_volume(root / site / f"Case{n:02d}.nii.gz", random_image(rng))
            value = 2 if (site, n) == ("BIDMC", 3) else 1
            write_volume(root / site / f"Case{n:02d}{suffix}.nii.gz", label_with(rng, (value,)))
    return root


def make_ibsr(parent: Path, rng) -> Path:
    root = parent / "IBSR_nifti_stripped"
    for n in (1, 2, 3):
        name = f"IBSR_{n:02d}"
        write_volume(root / name / f"{name}_ana_strip.nii.gz", random_image(rng)[None])
        write_volume(root / name / f"{name}_segTRI_fill_ana.nii.gz", label_with(rng, (1, 2, 3))[None])
    return root
