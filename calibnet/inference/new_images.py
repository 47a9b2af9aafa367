"""calib_predict on a folder of new images: what is refused before anything is written (an output folder that is
the input folder or inside it, or that holds earlier predictions without ``--overwrite``; a case whose channels do
not share one voxel grid), what is only warned about (channel files the model does not take, a voxel spacing far
from the training images'), and the prediction set written whole: into a temporary sibling folder, moved into
place when every case is done, so that a refused or failed prediction leaves no file and no empty folder.
"""
from __future__ import annotations

import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Callable

import SimpleITK as sitk

from calibnet.errors import CalibnetError
from calibnet.files import remove_stale_partials
from calibnet.image_geometry import first_geometry_difference
from calibnet.runs import CONFIDENCE_FILENAME, PROMPTS_FILENAME, is_nnunet_prediction_file

SPACING_FACTOR = 2.0  # a spacing more than this many times larger or smaller than the training median is warned of


def check_output_outside_input(input_dir: Path, output_dir: Path, prompts_from: Path | None = None) -> None:
    """Refuse an output folder that is the input folder or inside it (a later run would read its predictions as
    images), or the --prompts-from folder or inside it (predictions would replace its labels)."""
    output = Path(output_dir).resolve()
    inputs = Path(input_dir).resolve()
    if output == inputs or inputs in output.parents:
        where = "is the input folder" if output == inputs else f"is inside the input folder {input_dir}"
        raise CalibnetError(f"-o {output_dir} {where}: the predictions written there would be read as images by the "
                            f"next calib_predict; choose an -o outside -i.")
    labels = Path(prompts_from).resolve() if prompts_from is not None else None
    if labels is not None and (output == labels or labels in output.parents):
        raise CalibnetError(f"-o {output_dir} is the --prompts-from folder {prompts_from} or inside it: the "
                            f"predictions, named as its labels, would replace them; choose another -o.")


def earlier_predictions(output_dir: Path, file_ending: str) -> list:
    """The prediction files in ``output_dir`` (segmentations, .npz, confidence.json, prompts.json, and the files
    for nnU-Net's tools: .pkl, dataset.json, plans.json)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    return sorted(p for p in output_dir.iterdir() if p.is_file() and (
        p.name in (CONFIDENCE_FILENAME, PROMPTS_FILENAME) or p.name.endswith((file_ending, ".npz"))
        or is_nnunet_prediction_file(p.name)))


def check_no_earlier_predictions(output_dir: Path, file_ending: str, overwrite: bool) -> None:
    """Refuse an output folder holding predictions, unless ``overwrite``."""
    found = earlier_predictions(output_dir, file_ending)
    if found and not overwrite:
        listed = ", ".join(p.name for p in found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
        raise CalibnetError(f"{output_dir} already holds predictions ({listed}); pass --overwrite to replace them, "
                            f"or choose another -o.")


def _header(path: Path) -> tuple:
    """(size, spacing) of an image, from its header alone."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise CalibnetError(f"{path} cannot be read as an image.") from None
    return reader.GetSize(), reader.GetSpacing()


def check_case_channels(cases: list) -> dict:
    """{case: voxel spacing (x, y, z) in mm} of each CaseInput, refusing a case whose channel files differ in size
    or spacing (nnU-Net would stop with a bare RuntimeError, or print an error and go on)."""
    spacings = {}
    for case in cases:
        headers = [_header(path) for path in case.images]
        for path, header in zip(case.images[1:], headers[1:]):
            difference = first_geometry_difference(header, headers[0])
            if difference:
                name, value, expected = difference
                raise CalibnetError(f"case {case.case_id}: channel {path.name} has {name} {value} but "
                                    f"{case.images[0].name} has {expected}; the channels of a case must share one "
                                    f"voxel grid (resample them onto one before predicting).")
        spacings[case.case_id] = tuple(headers[0][1])
    return spacings


def training_spacing(plans: dict) -> tuple | None:
    """The training images' median voxel spacing (x, y, z) in mm, from nnU-Net's plans (None when absent)."""
    median = plans.get("original_median_spacing_after_transp")
    if median is None:
        return None
    backward = plans.get("transpose_backward", list(range(len(median))))
    return tuple(reversed([median[i] for i in backward]))  # array (z, y, x) order back to the image's (x, y, z)


def _mm(spacing) -> str:
    return " × ".join(f"{s:.3g}" for s in spacing)


def input_warnings(input_dir: Path, cases: list, spacings: dict, dataset_json: dict, plans: dict) -> list:
    """Warning lines: channel files beyond the model's channels (not read), and spacings more than
    SPACING_FACTOR times larger or smaller than the training median on any axis."""
    ending, channels = dataset_json["file_ending"], list(dataset_json["channel_names"].values())
    lines = []
    for case in cases:
        pattern = f"{case.case_id}_[0-9][0-9][0-9][0-9]{ending}"
        used = {path.name for path in case.images}
        extra = sorted(p.name for p in Path(input_dir).glob(pattern) if p.name not in used)
        if extra:
            lines.append(f"warning: case {case.case_id}: {', '.join(extra)} not used: the model takes "
                         f"{len(channels)} channel(s) ({', '.join(channels)}: _0000 to _{len(channels) - 1:04d}).")
    reference = training_spacing(plans)
    for case_id, spacing in spacings.items():
        if reference is None or len(spacing) != len(reference):
            continue
        if any(s > SPACING_FACTOR * r or s * SPACING_FACTOR < r for s, r in zip(spacing, reference)):
            lines.append(f"warning: case {case_id}: voxel spacing {_mm(spacing)} mm is far from the training images' "
                         f"{_mm(reference)} mm (median): nnU-Net resamples it, but the model never saw such images; "
                         f"check its prediction.")
    return lines


def _default_mode(base: int) -> int:
    mask = os.umask(0)
    os.umask(mask)
    return base & ~mask


def write_prediction_set(output_dir: Path, file_ending: str, predict: Callable[[Path], dict]) -> dict:
    """Run ``predict(folder)`` on a temporary sibling of ``output_dir``, then move what it wrote into ``output_dir``
    (created then), replacing the earlier predictions there; other files are left alone. Returns what ``predict``
    returns. When it fails, the temporary folder and any folder created for ``output_dir`` are removed; one left by
    a killed process is removed by the next call (``calibnet.files.remove_stale_partials``)."""
    output_dir = Path(output_dir).absolute()
    created = [p for p in (output_dir, *output_dir.parents) if not p.exists()]
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(output_dir)  # those of a killed calib_predict
    partial = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.{os.getpid()}@{socket.gethostname()}.",
                                    suffix=".partial", dir=output_dir.parent))
    try:
        result = predict(partial)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        for folder in created[1:]:  # deepest first; only the folders made here, if nothing else went in
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise
    if not output_dir.exists():
        os.chmod(partial, _default_mode(0o777))
        os.replace(partial, output_dir)
        return result
    for old in earlier_predictions(output_dir, file_ending):
        old.unlink()
    for new in sorted(partial.iterdir(), key=lambda p: p.name == CONFIDENCE_FILENAME):  # confidence.json last
        os.replace(new, output_dir / new.name)
    partial.rmdir()
    return result
