"""Data roots: ``CALIBNET_DATA`` mapped onto nnU-Net's ``nnUNet_raw/_preprocessed/_results``.

nnU-Net 2.8 reads its three roots lazily from the environment, so setting ``os.environ`` before the
first use is enough. Roots the user already set win, so an existing nnU-Net setup works unchanged.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from calibnet.errors import CalibnetError

DEFAULT_DATA_DIR = "calibnet_data"

# nnU-Net variable -> sub-folder of CALIBNET_DATA
_ROOT_SUBFOLDERS = {
    "nnUNet_raw": "raw",
    "nnUNet_preprocessed": "preprocessed",
    "nnUNet_results": "results",
}


@dataclass(frozen=True)
class DataRoots:
    raw: Path
    preprocessed: Path
    results: Path
    # for each root: "CALIBNET_DATA" when derived from it, else the nnU-Net variable that set it
    origin: dict

    def describe(self) -> str:
        """One line per root, saying where it comes from."""
        lines = [f"  {name:<13}{getattr(self, name)}  (from {self.origin[name]})" for name in _ROOT_SUBFOLDERS.values()]
        return "data roots:\n" + "\n".join(lines)


def calibnet_data_dir() -> Path:
    """The folder named by ``CALIBNET_DATA`` (default ``./calibnet_data``), made absolute."""
    return Path(os.environ.get("CALIBNET_DATA", DEFAULT_DATA_DIR)).expanduser().absolute()


def data_roots_in_use() -> DataRoots:
    """The roots :func:`setup_data_roots` would set up, without setting or creating anything."""
    base = calibnet_data_dir()
    resolved, origin = {}, {}
    for var, name in _ROOT_SUBFOLDERS.items():
        if os.environ.get(var):
            resolved[name] = Path(os.environ[var]).expanduser().absolute()
            origin[name] = var
        else:
            resolved[name] = base / name
            origin[name] = "CALIBNET_DATA"
    return DataRoots(origin=origin, **resolved)


def setup_data_roots(create: bool = True) -> DataRoots:
    """Set every unset ``nnUNet_*`` root from ``CALIBNET_DATA`` and return the roots in use.

    Roots already present in the environment are kept as they are.
    """
    roots = data_roots_in_use()
    for var, name in _ROOT_SUBFOLDERS.items():
        if roots.origin[name] == "CALIBNET_DATA":
            os.environ[var] = os.fspath(getattr(roots, name))
        if create:
            getattr(roots, name).mkdir(parents=True, exist_ok=True)
    return roots


def channel_files(folder: os.PathLike, case_id: str, dataset_json: dict) -> list:
    """nnU-Net's image files of one case: ``CASE_0000<ending>``, ``CASE_0001<ending>``, … one per channel."""
    ending = dataset_json["file_ending"]
    return [Path(folder) / f"{case_id}_{c:04d}{ending}" for c in range(len(dataset_json["channel_names"]))]


def dataset_id_of(text: str, roots: DataRoots) -> int:
    """The dataset id that ``-d`` names, as nnU-Net's ``maybe_convert_to_dataset_name`` reads it: an id (``501``),
    a folder name (``Dataset501_SynthBrain``) or, calibnet's addition, the name alone (``SynthBrain``).

    Folder names are checked against the ``DatasetXXX_NAME`` folders of the raw, preprocessed and results roots: a
    name that is not the id's folder there is refused naming both; an id with no folder yet is returned as is (the
    command then says what is missing, or creates it).
    """
    text = str(text).strip()
    folders = sorted({p.name for root in (roots.raw, roots.preprocessed, roots.results) if Path(root).is_dir()
                      for p in Path(root).glob("Dataset*_*") if p.is_dir() and re.match(r"Dataset\d{3,}_", p.name)})
    if text.isdigit():
        return int(text)
    match = re.fullmatch(r"Dataset(\d+)_(.+)", text)
    if match:
        dataset_id = int(match.group(1))
        known = [f for f in folders if f.startswith(f"Dataset{dataset_id:03d}_")]
        if known and f"Dataset{dataset_id:03d}_{match.group(2)}" not in known:
            raise CalibnetError(f"{text} does not match the dataset's folder: dataset {dataset_id} is "
                                f"{' and '.join(known)} in the data roots; give {dataset_id} or {known[0]}.")
        return dataset_id
    named = [f for f in folders if f.split("_", 1)[1] == text]
    if len(named) == 1:
        return int(re.match(r"Dataset(\d+)_", named[0]).group(1))
    listed = ", ".join(folders) if folders else f"none in {roots.raw}"
    if named:
        raise CalibnetError(f"several datasets are named {text} ({', '.join(named)}); give the id.")
    raise CalibnetError(f"no dataset is named {text}; give an id (501), a folder name "
                        f"(Dataset501_SynthBrain) or a name of the datasets there: {listed}.")
