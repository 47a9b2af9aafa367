"""Writing an nnU-Net v2 raw dataset (``imagesTr``, ``labelsTr``, ``dataset.json``) plus
``domains.csv``. Shared by every converter: the dataset is assembled in a temporary sibling folder
and renamed into place only when complete, so a failed conversion leaves nothing behind."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from calibnet.errors import CalibnetError

FILE_ENDING = ".nii.gz"


@dataclass(frozen=True)
class ImageGeometry:
    """SimpleITK geometry: spacing and origin in (x, y, z) order, direction as a row-major 3×3."""
    spacing_mm: tuple
    origin_mm: tuple
    direction: tuple = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def dataset_folder_name(dataset_id: int, name: str) -> str:
    """nnU-Net's folder name, e.g. ``Dataset501_SynthBrain``."""
    if not 1 <= int(dataset_id) <= 999:
        raise CalibnetError(f"dataset id {dataset_id} is out of range: nnU-Net ids are 1..999.")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name):
        raise CalibnetError(f"dataset name {name!r} must use letters, digits, '_' or '-' only.")
    return f"Dataset{int(dataset_id):03d}_{name}"


def target_dataset_folder(raw_root: Path, dataset_id: int, name: str, overwrite: bool) -> Path:
    """The folder a converter will write, after checking that the id is free (or may be replaced)."""
    folder = Path(raw_root) / dataset_folder_name(dataset_id, name)
    others = [p.name for p in Path(raw_root).glob(f"Dataset{int(dataset_id):03d}_*")
              if p.is_dir() and p.name != folder.name]
    if others:
        raise CalibnetError(
            f"dataset id {dataset_id} is already used by {Path(raw_root) / others[0]}; "
            f"pick another -d or remove that folder.")
    if folder.exists() and not overwrite:
        raise CalibnetError(f"{folder} already exists; pass --overwrite to replace it.")
    return folder


def write_case(folder: Path, case_id: str, channels: list, label: np.ndarray, geometry: ImageGeometry) -> None:
    """Write one training case; arrays are in SimpleITK order (z, y, x)."""
    for index, array in enumerate(channels):
        _write_image(array.astype(np.float32), folder / "imagesTr" / f"{case_id}_{index:04d}{FILE_ENDING}", geometry)
    _write_image(label.astype(np.uint8), folder / "labelsTr" / f"{case_id}{FILE_ENDING}", geometry)


def _write_image(array: np.ndarray, path: Path, geometry: ImageGeometry) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing([float(s) for s in geometry.spacing_mm])
    image.SetOrigin([float(o) for o in geometry.origin_mm])
    image.SetDirection([float(d) for d in geometry.direction])
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=True)


def make_dataset_json(channel_names: list, labels: dict, num_training: int, description: str = "",
                      regions_class_order: list | None = None, **extra) -> dict:
    """nnU-Net v2 ``dataset.json`` content; ``extra`` keys are kept (nnU-Net ignores them)."""
    content = {
        "channel_names": {str(i): name for i, name in enumerate(channel_names)},
        "labels": labels,
        "numTraining": int(num_training),
        "file_ending": FILE_ENDING,
    }
    if regions_class_order is not None:
        content["regions_class_order"] = list(regions_class_order)
    if description:
        content["description"] = description
    content.update(extra)
    return content
