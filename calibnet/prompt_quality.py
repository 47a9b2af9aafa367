"""The prompt-quality protocol: reproducible prompt sets of a stated quality per 2-D slice, drawn from the
ground truth (MedSAM-U §IV-A settings and SafeClick's imperfect prompts), shared by every prompted method.

Settings, spelled as users type them (``--prompts``):

| setting | prompts per slice |
|---|---|
| ``default`` | CalSAM's protocol: the mask centroid (foreground) + a background point (``calibnet.prompts``) |
| ``3P``, ``5P``, ``10P`` (``kP``) | k foreground points drawn uniformly from the mask |
| ``3B0.5``, ``3B0.75`` (``kB(r)``) | k boxes whose IoU with the ground-truth box is r (within ``IOU_TOLERANCE``) |
| ``3P+3B0.5``, ``10P+3B0.75`` | both |
| ``P0``, ``P25`` … ``P100`` | one point: the centre of mass displaced by that % of the object radius |
| ``B100``, ``B50`` … ``B150`` | one box: the ground-truth box scaled to that % about its centre |

Conventions: points are (row, col) and boxes (row0, col0, row1, col1) with (row1, col1) the last covered
pixel, as :func:`calibnet.prompts.slice_box` — SAM's inclusive pixel corners; coordinates are floats
(SAM takes sub-pixel prompts), clipped to the slice. Box IoU is computed on pixel edges, i.e. a box
covers [row0, row1 + 1) × [col0, col1 + 1). The object radius is the equivalent-circle radius
sqrt(area / π) of the slice's mask. A slice with an empty mask gets no prompt.
"""
from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from calibnet.errors import CalibnetError
from calibnet.prompts import slice_box, slice_point_prompts

IOU_TOLERANCE = 0.01
_SETTING = re.compile(r"^(?:(?P<points>\d+)P)?\+?(?:(?P<boxes>\d+)B(?P<iou>0?\.\d+|1(?:\.0*)?))?$")


@dataclass(frozen=True)
class PromptSetting:
    """One prompt-quality setting (see the module table)."""
    name: str
    points: int = 0  # kP: random foreground points
    boxes: int = 0  # kB(r): boxes at IoU r
    box_iou: float | None = None
    displacement: float | None = None  # P<d>: one point displaced by d × the object radius
    box_scale: float | None = None  # B<s>: the ground-truth box scaled by s
    default: bool = False  # CalSAM: centroid + background point


@dataclass
class SlicePrompts:
    """The prompts of one slice: points with labels (1 foreground, 0 background) and boxes."""
    points: list = field(default_factory=list)
    labels: list = field(default_factory=list)
    boxes: list = field(default_factory=list)


def parse_setting(text: str) -> PromptSetting:
    """``"3P+3B0.5"`` → PromptSetting(points=3, boxes=3, box_iou=0.5), etc.; a clear error otherwise."""
    name = text.strip()
    if name == "default":
        return PromptSetting(name, default=True)
    single = re.fullmatch(r"([PB])(\d+)", name)
    if single:
        percent = int(single.group(2))
        if single.group(1) == "P" and 0 <= percent <= 100:
            return PromptSetting(name, displacement=percent / 100)
        if single.group(1) == "B" and 0 < percent <= 300:
            return PromptSetting(name, box_scale=percent / 100)
    match = _SETTING.match(name)
    if match and (match["points"] or match["boxes"]) and (bool(match["boxes"]) == bool(match["iou"])) \
            and ("+" not in name or (match["points"] and match["boxes"])):
        points, boxes = int(match["points"] or 0), int(match["boxes"] or 0)
        iou = float(match["iou"]) if match["iou"] else None
        if (points or boxes) and (iou is None or 0 < iou <= 1) and points <= 100 and boxes <= 100:
            return PromptSetting(name, points=points, boxes=boxes, box_iou=iou)
    raise CalibnetError(f"unknown prompt setting {text!r}: use default, kP (3P, 5P, 10P), kB(r) (3B0.5, 3B0.75), "
                        f"kP+kB(r) (3P+3B0.5), P0…P100 (point displaced by % of the object radius) or B50…B150 "
                        f"(ground-truth box scaled to %).")


def prompt_rng(seed: int, case_id: str, slice_index: int, setting: PromptSetting) -> np.random.Generator:
    """The generator of one slice's prompts: the same (seed, case, slice, setting) always gives the same set."""
    return np.random.default_rng([seed, zlib.crc32(case_id.encode()), slice_index, zlib.crc32(setting.name.encode())])


def object_radius(mask: np.ndarray) -> float:
    """Equivalent-circle radius sqrt(area / π) of a 2-D mask, in pixels."""
    return float(np.sqrt(mask.sum() / np.pi))


def box_iou(a, b) -> float:
    """IoU of two (row0, col0, row1, col1) boxes with inclusive last pixels (edges at row1 + 1, col1 + 1)."""
    a_edges, b_edges = _edges(a), _edges(b)
    height = min(a_edges[2], b_edges[2]) - max(a_edges[0], b_edges[0])
    width = min(a_edges[3], b_edges[3]) - max(a_edges[1], b_edges[1])
    intersection = max(height, 0.0) * max(width, 0.0)
    union = _area(a_edges) + _area(b_edges) - intersection
    return float(intersection / union) if union > 0 else 0.0


def _edges(box) -> np.ndarray:
    r0, c0, r1, c1 = (float(v) for v in box)
    return np.array([r0, c0, r1 + 1, c1 + 1])


def _area(edges) -> float:
    return max(edges[2] - edges[0], 0.0) * max(edges[3] - edges[1], 0.0)


def _from_edges(edges: np.ndarray) -> tuple:
    return float(edges[0]), float(edges[1]), float(edges[2] - 1), float(edges[3] - 1)


def _clip_edges(edges: np.ndarray, shape) -> np.ndarray:
    return np.array([np.clip(edges[0], 0, shape[0]), np.clip(edges[1], 0, shape[1]),
                     np.clip(edges[2], 0, shape[0]), np.clip(edges[3], 0, shape[1])])


def _box_around(centre: np.ndarray, size: np.ndarray) -> np.ndarray:
    return np.concatenate([centre - size / 2, centre + size / 2])


def box_at_iou(truth_box, iou: float, shape, rng: np.random.Generator, tolerance: float = IOU_TOLERANCE,
               max_tries: int = 50) -> tuple:
    """A box whose IoU with ``truth_box`` is ``iou`` ± ``tolerance``, inside a slice of ``shape``: its height
    and width are the truth's scaled by random factors, then it is shifted in a random direction by the
    distance (found by bisection) that brings the IoU down to ``iou``. When no such box fits the slice
    (an object filling it), a box inside the truth with area ratio ``iou`` is used."""
    truth = _edges(truth_box)
    size = truth[2:] - truth[:2]
    for _ in range(max_tries):
        scale = np.exp(rng.uniform(-1, 1, size=2) * -np.log(iou) / 2)  # each side within [√r, 1/√r] of the truth
        new_size = size * scale
        step = rng.normal(size=2)
        step *= size / (np.linalg.norm(step) + 1e-12)  # a shift of t moves the centre by t × the truth's size
        centre = (truth[:2] + truth[2:]) / 2
        if box_iou(truth_box, _from_edges(_box_around(centre, new_size))) < iou:
            continue
        low, high = 0.0, 2.0
        for _ in range(60):
            middle = (low + high) / 2
            overlap = box_iou(truth_box, _from_edges(_box_around(centre + middle * step, new_size)))
            low, high = (middle, high) if overlap >= iou else (low, middle)
        edges = _clip_edges(_box_around(centre + low * step, new_size), shape)
        box = _from_edges(edges)
        if _area(edges) > 0 and abs(box_iou(truth_box, box) - iou) <= tolerance:
            return box
    # near the border no shifted box may fit: a box inside the truth with area ratio r has IoU exactly r
    share = iou ** rng.uniform(0, 1)
    inner = size * np.array([share, iou / share])
    corner = truth[:2] + rng.uniform(0, 1, size=2) * (size - inner)
    return _from_edges(np.concatenate([corner, corner + inner]))


def scaled_box(truth_box, scale: float, shape) -> tuple:
    """The ground-truth box with height and width scaled by ``scale`` about its centre, clipped to the slice."""
    edges = _edges(truth_box)
    centre, half = (edges[:2] + edges[2:]) / 2, (edges[2:] - edges[:2]) * scale / 2
    return _from_edges(_clip_edges(np.concatenate([centre - half, centre + half]), shape))


def displaced_point(mask: np.ndarray, fraction: float, rng: np.random.Generator) -> tuple:
    """The mask's centre of mass moved by ``fraction`` × its equivalent radius in a random direction (the
    direction is redrawn, up to 100 times, until the point stays inside the slice)."""
    centre = np.array(ndimage.center_of_mass(mask))
    distance = fraction * object_radius(mask)
    for _ in range(100):
        angle = rng.uniform(0, 2 * np.pi)
        point = centre + distance * np.array([np.sin(angle), np.cos(angle)])
        if np.all(point >= 0) and np.all(point <= np.array(mask.shape) - 1):
            return float(point[0]), float(point[1])
    return tuple(float(v) for v in np.clip(point, 0, np.array(mask.shape) - 1))


def random_points(mask: np.ndarray, k: int, rng: np.random.Generator) -> list:
    """k foreground pixels drawn uniformly from the mask (with replacement only when it has fewer than k)."""
    where = np.argwhere(mask)
    chosen = rng.choice(len(where), size=k, replace=len(where) < k)
    return [(float(r), float(c)) for r, c in where[chosen]]


def slice_prompts(mask: np.ndarray, setting: PromptSetting, rng: np.random.Generator) -> SlicePrompts | None:
    """The prompts of ``setting`` for one 2-D boolean mask; None when the mask is empty."""
    if not mask.any():
        return None
    prompts = SlicePrompts()
    if setting.default:
        foreground, background = slice_point_prompts(mask, rng)
        prompts.points.append(tuple(float(v) for v in foreground))
        prompts.labels.append(1)
        if background is not None:
            prompts.points.append(tuple(float(v) for v in background))
            prompts.labels.append(0)
        return prompts
    if setting.points:
        prompts.points += random_points(mask, setting.points, rng)
        prompts.labels += [1] * setting.points
    if setting.displacement is not None:
        prompts.points.append(displaced_point(mask, setting.displacement, rng))
        prompts.labels.append(1)
    truth = slice_box(mask)
    if setting.boxes:
        prompts.boxes += [box_at_iou(truth, setting.box_iou, mask.shape, rng) for _ in range(setting.boxes)]
    if setting.box_scale is not None:
        prompts.boxes.append(scaled_box(truth, setting.box_scale, mask.shape))
    return prompts
