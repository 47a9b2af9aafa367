"""Checks a raw dataset must pass before anything is planned or preprocessed, each failing with one
message that names the file or case: dataset.json well-formed, every case with all its channels and a
label, ``domains.csv`` complete, image/label geometry equal, no NaN voxels."""
from __future__ import annotations

import json
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

from calibnet.domains import DOMAINS_FILENAME, check_domain_spellings, check_domains_cover_cases, read_domains
from calibnet.errors import CalibnetError
from calibnet.image_geometry import first_geometry_difference
from calibnet.paths import channel_files

REQUIRED_DATASET_JSON_KEYS = ("channel_names", "labels", "numTraining", "file_ending")


@dataclass(frozen=True)
class RawDataset:
    folder: Path
    dataset_json: dict
    cases: dict  # case_id -> {"images": [paths], "label": path}
    domains: pd.DataFrame


def read_dataset_json(folder: Path) -> dict:
    """Parse ``dataset.json`` and check the keys nnU-Net needs."""
    path = folder / "dataset.json"
    if not path.is_file():
        raise CalibnetError(f"{path} is missing; a raw dataset needs nnU-Net's dataset.json.")
    try:
        content = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CalibnetError(f"{path} is not valid JSON ({e}); fix or regenerate it.") from None
    if not isinstance(content, dict):
        raise CalibnetError(f"{path} must hold a JSON object.")
    missing = [k for k in REQUIRED_DATASET_JSON_KEYS if k not in content]
    if missing:
        raise CalibnetError(f"{path} lacks {', '.join(missing)}; see nnU-Net's dataset_format documentation.")
    if not isinstance(content["channel_names"], dict) or not content["channel_names"]:
        raise CalibnetError(f"{path}: 'channel_names' must map channel index to name, e.g. {{\"0\": \"T1\"}}.")
    if not isinstance(content["labels"], dict) or content["labels"].get("background") != 0:
        raise CalibnetError(f"{path}: 'labels' must be an object with \"background\": 0.")
    return content


def list_cases(folder: Path, dataset_json: dict) -> dict:
    """case_id -> image paths (one per channel, in channel order) and label path; checks they exist."""
    ending = dataset_json["file_ending"]
    images_dir, labels_dir = folder / "imagesTr", folder / "labelsTr"
    for d in (images_dir, labels_dir):
        if not d.is_dir():
            raise CalibnetError(f"{d} is missing; nnU-Net raw datasets keep training cases in imagesTr/ and labelsTr/.")
    n_channels = len(dataset_json["channel_names"])
    case_ids = sorted({p.name[:-len(ending) - 5] for p in images_dir.glob(f"*_[0-9][0-9][0-9][0-9]{ending}")})
    if not case_ids:
        raise CalibnetError(f"{images_dir} holds no images named CASE_XXXX{ending}.")
    cases = {}
    for case_id in case_ids:
        images = channel_files(images_dir, case_id, dataset_json)
        missing = [p.name for p in images if not p.is_file()]
        if missing:
            raise CalibnetError(f"case {case_id}: {images_dir / missing[0]} is missing "
                                f"(dataset.json declares {n_channels} channel(s)).")
        label = labels_dir / f"{case_id}{ending}"
        if not label.is_file():
            raise CalibnetError(f"case {case_id}: label {label} is missing.")
        cases[case_id] = {"images": images, "label": label}
    if dataset_json["numTraining"] != len(cases):
        raise CalibnetError(f"{folder / 'dataset.json'}: numTraining is {dataset_json['numTraining']} but imagesTr "
                            f"holds {len(cases)} cases; set it to {len(cases)}.")
    return cases


def _read_geometry(path: Path) -> tuple:
    """(size, spacing, origin, direction, components) from the header alone."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return (reader.GetSize(), reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection(),
            reader.GetNumberOfComponents())


def count_nan_voxels(path: Path) -> int:
    """NaN voxels stored in the file. SimpleITK's NIfTI reader turns NaN into 0 silently, so NIfTI files
    are read with nibabel, which returns the stored values."""
    if path.name.endswith((".nii", ".nii.gz")):
        import nibabel as nib
        data = np.asanyarray(nib.load(str(path)).dataobj)
    else:
        data = sitk.GetArrayViewFromImage(sitk.ReadImage(str(path)))
    return int(np.isnan(data).sum()) if np.issubdtype(data.dtype, np.floating) else 0


# what reading a damaged file raises: a truncated .nii.gz ends the gzip stream early (EOFError, which click would
# turn into a bare "Aborted!"), a corrupt one fails zlib's checks
UNREADABLE = (RuntimeError, OSError, ValueError, EOFError, zlib.error)


def _why(error: BaseException) -> str:
    """What to add to "cannot be read as an image" for ``error``."""
    if isinstance(error, EOFError):
        return " (the file is truncated: its compressed data ends early)"
    if isinstance(error, zlib.error):
        return " (its compressed data is corrupt)"
    return ""


def check_case(case_id: str, images: list, label: Path) -> str | None:
    """None when the case is sound, else a one-line description of what is wrong with it."""
    try:
        reference = _read_geometry(label)
        if count_nan_voxels(label):
            return f"case {case_id}: label {label} contains NaN voxels."
    except UNREADABLE as e:
        return f"case {case_id}: {label} cannot be read as an image{_why(e)}."
    for path in images:
        try:
            geometry = _read_geometry(path)
            n_nan = count_nan_voxels(path)
        except UNREADABLE as e:
            return f"case {case_id}: {path} cannot be read as an image{_why(e)}."
        difference = first_geometry_difference(geometry, reference)
        if difference:
            name, value, expected = difference
            return (f"case {case_id}: image {path.name} has {name} {value} but label has {expected}; "
                    f"image and label must share one geometry (resample one onto the other).")
        if geometry[4] != 1:
            return f"case {case_id}: {path.name} has several components per voxel; save one channel per file."
        if n_nan:
            return f"case {case_id}: image {path.name} contains {n_nan} NaN voxel(s); replace them before planning."
    return None


def _check_case_args(args):
    return check_case(*args)


def check_raw_dataset(folder: Path, num_processes: int = 1) -> RawDataset:
    """Run every check on the raw dataset in ``folder``; the first problem found raises."""
    folder = Path(folder)
    dataset_json = read_dataset_json(folder)
    cases = list_cases(folder, dataset_json)
    domains = read_domains(folder / DOMAINS_FILENAME)
    check_domains_cover_cases(domains, cases.keys(), folder / DOMAINS_FILENAME)
    check_domain_spellings(domains, folder / DOMAINS_FILENAME)
    jobs = [(case_id, c["images"], c["label"]) for case_id, c in cases.items()]
    if num_processes > 1:
        with ProcessPoolExecutor(num_processes) as pool:
            problems = list(pool.map(_check_case_args, jobs, chunksize=4))
    else:
        problems = [check_case(*job) for job in jobs]
    problems = [p for p in problems if p]
    if problems:
        more = f" ({len(problems) - 1} more case(s) have problems too)" if len(problems) > 1 else ""
        raise CalibnetError(problems[0] + more)
    return RawDataset(folder=folder, dataset_json=dataset_json, cases=cases, domains=domains)
