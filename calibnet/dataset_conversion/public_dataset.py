"""Shared machinery of the public-dataset converters.

A converter only reads its publisher's layout and metadata into :class:`SourceCases`; this module
does the rest the same way for every dataset: read each case (a time frame of a 4-D file where
needed), check label values against the dataset's expected set and remap them, check that every
channel shares the label's geometry, and write nnU-Net raw format plus ``domains.csv`` through a
temporary folder that is renamed into place only when complete. The input folder is only read.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk
from tqdm import tqdm

from calibnet.dataset_conversion.raw_dataset import FILE_ENDING, make_dataset_json, target_dataset_folder
from calibnet.domains import DOMAINS_FILENAME, write_domains
from calibnet.errors import CalibnetError
from calibnet.files import atomic_output_dir, atomic_write_json
from calibnet.image_geometry import first_geometry_difference, geometry_of


@dataclass(frozen=True)
class SourceCase:
    """One training case as the publisher stores it."""
    case_id: str
    images: tuple  # one path per channel, in channel order
    label: Path
    domain: dict  # center, vendor and any other domains.csv columns
    frame: int | None = None  # time frame to take from 4-D (x, y, z, t) files


@dataclass
class SourceCases:
    """What a converter found: the cases and how to describe and label them."""
    dataset: str  # short name, e.g. "BraTS 2023 GLI"
    cases: list
    channel_names: list
    labels: dict  # nnU-Net `labels` (target values)
    label_map: dict  # every allowed source label value -> target value
    regions_class_order: list | None = None
    reported_label_values: tuple = ()  # source values whose remapping is reported (a known quirk)
    notes: list = field(default_factory=list)  # what was skipped or inferred, said to the user


@dataclass
class ConversionSummary:
    folder: Path
    n_cases: int
    counts: pd.DataFrame  # cases per center and vendor
    notes: list


def read_volume(path: Path, frame: int | None = None) -> sitk.Image:
    """A 3-D image from ``path``; 4-D files give time frame ``frame`` (or their single frame)."""
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError:
        raise CalibnetError(f"{path} cannot be read as an image.") from None
    if image.GetDimension() == 4:
        n_frames = image.GetSize()[3]
        if frame is None:
            if n_frames != 1:
                raise CalibnetError(f"{path} is 4-D with {n_frames} frames where one 3-D volume was expected.")
            frame = 0
        if not 0 <= frame < n_frames:
            raise CalibnetError(f"{path} has {n_frames} frames; frame {frame} does not exist.")
        size = list(image.GetSize())
        size[3] = 0
        image = sitk.Extract(image, size, [0, 0, 0, frame])
    elif image.GetDimension() != 3:
        raise CalibnetError(f"{path} is {image.GetDimension()}-D; a 3-D volume was expected.")
    return image


def _convert_case(case: SourceCase, found: SourceCases, folder: Path, remapped: Counter) -> None:
    label_image = read_volume(case.label, case.frame)
    label = sitk.GetArrayFromImage(label_image)
    if np.issubdtype(label.dtype, np.floating):
        if np.isnan(label).any():
            raise CalibnetError(f"{case.label} contains NaN voxels.")
        label = np.rint(label)
    values = set(np.unique(label).astype(int).tolist())
    unexpected = sorted(values - set(found.label_map))
    if unexpected:
        raise CalibnetError(f"{case.label} has label value(s) {unexpected} outside the expected "
                            f"{sorted(found.label_map)} for {found.dataset}.")
    for value in found.reported_label_values:
        n = int((label == value).sum())
        if n:
            remapped[value] += 1
    target = np.zeros(label.shape, dtype=np.uint8)
    for source_value, target_value in found.label_map.items():
        target[label == source_value] = target_value
    out_label = sitk.GetImageFromArray(target)
    out_label.CopyInformation(label_image)
    images = []
    for path in case.images:
        image = read_volume(path, case.frame)
        difference = first_geometry_difference(geometry_of(image), geometry_of(label_image))
        if difference:
            name, value, expected = difference
            raise CalibnetError(f"{path} does not share the geometry of its label {case.label.name}: "
                                f"{name} {value} vs {expected}.")
        if image.GetNumberOfComponentsPerPixel() != 1:
            raise CalibnetError(f"{path} has several components per voxel; expected one channel per file.")
        images.append(image)
    for index, image in enumerate(images):
        sitk.WriteImage(image, str(folder / "imagesTr" / f"{case.case_id}_{index:04d}{FILE_ENDING}"),
                        useCompression=True)
    sitk.WriteImage(out_label, str(folder / "labelsTr" / f"{case.case_id}{FILE_ENDING}"), useCompression=True)


def write_public_dataset(found: SourceCases, raw_root: Path, dataset_id: int, name: str, overwrite: bool = False,
                         progress: bool = True) -> ConversionSummary:
    """Write the cases of ``found`` as dataset ``dataset_id``; nothing is left behind on error."""
    if not found.cases:
        raise CalibnetError(f"no {found.dataset} training cases were found.")
    ids = [c.case_id for c in found.cases]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise CalibnetError(f"case id {duplicates[0]} occurs twice in the input; check for a copied folder.")
    final = target_dataset_folder(Path(raw_root), dataset_id, name, overwrite)
    remapped = Counter()
    with atomic_output_dir(final, overwrite=overwrite) as folder:
        (folder / "imagesTr").mkdir()
        (folder / "labelsTr").mkdir()
        for case in tqdm(found.cases, desc=f"converting {found.dataset}", unit="case", disable=not progress):
            _convert_case(case, found, folder, remapped)
        domains = pd.DataFrame([{"case_id": c.case_id, **c.domain} for c in found.cases])
        write_domains(domains, folder / DOMAINS_FILENAME)
        atomic_write_json(folder / "dataset.json", make_dataset_json(
            found.channel_names, found.labels, len(found.cases), description=f"{found.dataset}, converted by calibnet",
            regions_class_order=found.regions_class_order))
    notes = list(found.notes)
    for value, n_cases in sorted(remapped.items()):
        notes.append(f"label value {value} was mapped to {found.label_map[value]} in {n_cases} case(s)")
    if (domains["vendor"] == "unknown").all():
        notes.append("no vendor is known: the scanner split needs vendor information (for BraTS: --vendors CSV)")
    if domains["center"].nunique() < 2:
        notes.append("all cases come from one center: leave-one-center-out is not possible for this dataset")
    counts = domains.groupby(["center", "vendor"]).size().rename("cases").reset_index()
    return ConversionSummary(folder=final, n_cases=len(found.cases), counts=counts, notes=notes)


def locate_root(input_dir: Path, is_root, description: str) -> Path:
    """``input_dir`` itself when ``is_root`` accepts it, else its one child that it accepts."""
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise CalibnetError(f"{input_dir} is not a folder.")
    if is_root(input_dir):
        return input_dir
    children = [c for c in sorted(input_dir.iterdir()) if c.is_dir() and is_root(c)]
    if len(children) == 1:
        return children[0]
    if len(children) > 1:
        raise CalibnetError(f"{input_dir} holds several {description} folders "
                            f"({', '.join(c.name for c in children)}); give the one to convert.")
    raise CalibnetError(f"{input_dir} does not look like {description}; give the folder the archive unpacks to.")


def read_metadata_csv(path: Path, **kwargs) -> pd.DataFrame:
    """A publisher's CSV (any line endings, optional BOM) with stripped column names."""
    try:
        table = pd.read_csv(path, encoding="utf-8-sig", **kwargs)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise CalibnetError(f"{path} is not a readable CSV file ({e}).") from None
    table.columns = [str(c).strip() for c in table.columns]
    return table


def require_columns(table: pd.DataFrame, columns, path: Path) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise CalibnetError(f"{path} lacks the column(s) {', '.join(missing)}; found {', '.join(table.columns)}.")


VENDOR_ALIASES = {"siemens": "Siemens", "philips": "Philips", "ge": "GE", "general electric": "GE",
                  "canon": "Canon", "toshiba": "Canon"}


def normalise_vendor(raw) -> str:
    """Publisher spellings ('SIEMENS', 'Philips Medical Systems', 'GE MEDICAL SYSTEMS') -> Siemens, Philips, GE."""
    text = str(raw).strip().lower() if raw is not None and not pd.isna(raw) else ""
    if not text:
        return "unknown"
    for key, vendor in VENDOR_ALIASES.items():
        if text == key or text.startswith(key + " ") or text.startswith(key + "_"):
            return vendor
    return str(raw).strip()
