"""Data roots: ``CALIBNET_DATA`` mapped onto nnU-Net's ``nnUNet_raw/_preprocessed/_results``.

nnU-Net 2.8 reads its three roots lazily from the environment, so setting ``os.environ`` before the
first use is enough. Roots the user already set win, so an existing nnU-Net setup works unchanged.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

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


def setup_data_roots(create: bool = True) -> DataRoots:
    """Set every unset ``nnUNet_*`` root from ``CALIBNET_DATA`` and return the roots in use.

    Roots already present in the environment are kept as they are.
    """
    base = calibnet_data_dir()
    resolved, origin = {}, {}
    for var, name in _ROOT_SUBFOLDERS.items():
        if os.environ.get(var):
            resolved[name] = Path(os.environ[var]).expanduser().absolute()
            origin[name] = var
        else:
            resolved[name] = base / name
            origin[name] = "CALIBNET_DATA"
            os.environ[var] = os.fspath(resolved[name])
        if create:
            resolved[name].mkdir(parents=True, exist_ok=True)
    return DataRoots(origin=origin, **resolved)


def channel_files(folder: os.PathLike, case_id: str, dataset_json: dict) -> list:
    """nnU-Net's image files of one case: ``CASE_0000<ending>``, ``CASE_0001<ending>``, … one per channel."""
    ending = dataset_json["file_ending"]
    return [Path(folder) / f"{case_id}_{c:04d}{ending}" for c in range(len(dataset_json["channel_names"]))]
