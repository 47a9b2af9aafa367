"""Predictions made elsewhere (nnU-Net, MedSAM, …) scored beside calibnet's runs (``calib_evaluate --predictions
FOLDER --name NAME``): a flat folder of nnU-Net-format ``CASE<file_ending>`` segmentations, each with an optional
``CASE.npz`` of probabilities as nnU-Net's ``--save_probabilities`` writes them (and calibnet's runs do): key
``probabilities``, (C, z, y, x) in the raw image's geometry. The ``.pkl`` files nnU-Net writes beside them are never
read (unpickling runs code). The split and fold decide which cases are source (val) and target (test)."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from calibnet.errors import CalibnetError
from calibnet.files import file_sha256
from calibnet.image_geometry import first_geometry_difference, geometry_of
from calibnet.methods import METHODS
from calibnet.runs import ROLES, case_prediction_files

EXTERNAL_CONFIGURATION = "external"  # the configuration column of external rows
EXTERNAL_SEED = -1  # the seed column of external rows: predictions made elsewhere have no calibnet seed


@dataclass(frozen=True)
class ExternalPredictions:
    """A folder of predictions and the NAME its rows carry."""
    name: str
    folder: Path


def external_predictions(folders, names) -> list:
    """The (FOLDER, NAME) pairs of ``--predictions``/``--name``, given in the same order, checked: as many names as
    folders, distinct names that no calibnet method or table row could be taken for, existing folders."""
    folders, names = list(folders or ()), list(names or ())
    if len(folders) != len(names):
        raise CalibnetError(f"{len(folders)} --predictions and {len(names)} --name: give each prediction folder its "
                            f"name (--predictions FOLDER --name NAME, repeated per folder).")
    for name in names:
        if not name.strip() or " + " in name or name.endswith("]"):
            raise CalibnetError(f"--name {name!r}: names cannot be empty, contain ' + ' or end with ']' (the tables "
                                f"use them for post-hoc and prompt-setting rows).")
        if name.split(" (")[0] in METHODS:
            raise CalibnetError(f"--name {name!r} is a calibnet method; name the external predictions differently "
                                f"(e.g. {name.split(' (')[0]}_external).")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise CalibnetError(f"--name {', '.join(repeated)} is given to several prediction folders; name each one "
                            f"differently.")
    for folder in folders:
        if not Path(folder).is_dir():
            raise CalibnetError(f"--predictions {folder}: no such folder.")
    return [ExternalPredictions(name, Path(folder).absolute()) for folder, name in zip(folders, names)]


@dataclass(frozen=True)
class ExternalSet:
    """External predictions scored on one fold: its cases are the fold's val (source) and test (target) cases, all
    present in the folder."""
    predictions: ExternalPredictions
    fold: int
    probabilities: bool  # every case has its CASE.npz (else none has: segmentation metrics only)
    files: tuple  # the files scored

    configuration = EXTERNAL_CONFIGURATION
    seed = EXTERNAL_SEED

    @property
    def note(self) -> str:
        return "external predictions" + ("" if self.probabilities else ", no probabilities")


def predicted_cases(folder: Path, file_ending: str) -> set:
    """The case ids of the segmentations in a prediction folder."""
    return {p.name[:-len(file_ending)] for p in Path(folder).iterdir()
            if p.name.endswith(file_ending) and p.is_file()}


def external_set(predictions: ExternalPredictions, split: str, fold: dict, data) -> tuple:
    """(ExternalSet, notes) for one fold of ``split``, or (None, [missing message]) when the folder lacks a val or
    test case, or gives probabilities for some cases only. Predicted cases of the fold's train set are left out
    and counted in a note. Every segmentation scored is checked against its raw label (:func:`check_segmentation`)."""
    ending = data.dataset_json["file_ending"]
    present = predicted_cases(predictions.folder, ending)
    where = f"{predictions.name} {split} fold {fold['fold']}"
    cases = [case_id for role in ROLES for case_id in fold[role]]
    lacking = [f"{role} {case_id} (segmentation)" for role in ROLES for case_id in fold[role] if case_id not in present]
    with_npz = [c for c in cases if case_prediction_files(predictions.folder, c, ending)[1].is_file()]
    if lacking:
        more = f" and {len(lacking) - 3} more" if len(lacking) > 3 else ""
        return None, [f"{where}: incomplete predictions: {'; '.join(lacking[:3])}{more} (not evaluated; "
                      f"predict them into {predictions.folder})"]
    if with_npz and len(with_npz) < len(cases):
        without = [c for c in cases if c not in with_npz]
        return None, [f"{where}: probabilities (.npz) for {len(with_npz)} of {len(cases)} cases, not for "
                      f"{', '.join(without[:3])}{' …' if len(without) > 3 else ''} (not evaluated; give every case "
                      f"its CASE.npz, or none for segmentation metrics only)"]
    for case_id in cases:
        check_segmentation(case_prediction_files(predictions.folder, case_id, ending)[0], data.label_path(case_id),
                           data.dataset_json)
    files = tuple(p for case_id in cases for p in case_prediction_files(predictions.folder, case_id, ending)
                  if p.is_file())
    notes = []
    train = sorted(present & set(fold["train"]))
    if train:
        notes.append(f"{where}: {len(train)} predicted cases of the fold's train set left out")
    if not with_npz:
        notes.append(f"{where}: no probabilities (no CASE.npz): segmentation metrics only, no calibration or "
                     f"failure detection")
    return ExternalSet(predictions, int(fold["fold"]), bool(with_npz), files), notes


def label_values(dataset_json: dict) -> set:
    """Every value a segmentation of the dataset may hold (background and each label; regions' labels)."""
    values = {0}
    for value in dataset_json["labels"].values():
        values.update(value if isinstance(value, list) else [value])
    return values


def check_segmentation(path: Path, label_path: Path, dataset_json: dict) -> None:
    """Refuse (naming the file) a segmentation that cannot be overlaid on its raw label or holds a value that is no
    label of the dataset."""
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise CalibnetError(f"{path}: not a readable image ({str(error).strip().splitlines()[-1]}).") from None
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(label_path))
    reader.ReadImageInformation()
    reference = (reader.GetSize(), reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection())
    difference = first_geometry_difference(geometry_of(image), reference)
    if difference:
        name, value, expected = difference
        raise CalibnetError(f"{path}: {name} {value} differs from the raw label {label_path} ({expected}); write "
                            f"predictions in the raw image's geometry, as nnU-Net's predict does.")
    unknown = sorted(set(np.unique(sitk.GetArrayViewFromImage(image)).tolist()) - label_values(dataset_json))
    if unknown:
        raise CalibnetError(f"{path}: values {', '.join(map(str, unknown[:5]))} are no label of the dataset "
                            f"({', '.join(map(str, sorted(label_values(dataset_json))))}).")


def external_identity(sets: list) -> dict:
    """summary.json's record of each external NAME: its folder, the number of files scored and the sha256 over
    their names and contents (sorted by name), and whether it had probabilities."""
    identity = {}
    for name in sorted({s.predictions.name for s in sets}):
        of_name = [s for s in sets if s.predictions.name == name]
        files = sorted({p for s in of_name for p in s.files}, key=lambda p: p.name)
        digest = hashlib.sha256()
        for path in files:
            digest.update(f"{path.name}\0{file_sha256(path)}\n".encode())
        identity[name] = {"folder": str(of_name[0].predictions.folder), "files": len(files),
                          "sha256": digest.hexdigest(), "probabilities": of_name[0].probabilities,
                          "folds": sorted(s.fold for s in of_name)}
    return identity
