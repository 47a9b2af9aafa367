"""Prompt protocols shared by training and inference.

CalSAM's point protocol, per slice along the first array axis (the axial axis of nnU-Net's arrays for
typical MRI): the foreground point is the centroid of the slice's ground-truth mask (moved to the nearest
mask voxel when the centroid falls outside a non-convex mask), the background point is a background voxel
at least ``min_background_distance`` voxels from the mask, drawn with the given generator (the farthest
background voxel when none is that far). A slice with empty ground truth gets no prompt.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

PROMPT_CHANNELS = 2  # foreground heat map, background heat map
DEFAULT_MIN_BACKGROUND_DISTANCE = 5.0
DEFAULT_HEATMAP_SIGMA = 2.0


def slice_point_prompts(mask: np.ndarray, rng: np.random.Generator,
                        min_background_distance: float = DEFAULT_MIN_BACKGROUND_DISTANCE):
    """((fg_row, fg_col), (bg_row, bg_col)) for a 2-D boolean ``mask``, or None when the mask is empty.
    The background point is None when the slice has no background at all."""
    if not mask.any():
        return None
    centroid = np.round(ndimage.center_of_mass(mask)).astype(int)
    if not mask[tuple(centroid)]:
        _, nearest = ndimage.distance_transform_edt(~mask, return_indices=True)
        centroid = nearest[:, centroid[0], centroid[1]]
    background = ~mask
    if not background.any():
        return tuple(int(c) for c in centroid), None
    distance = ndimage.distance_transform_edt(background)
    candidates = np.argwhere(distance >= min_background_distance)
    if len(candidates):
        bg = candidates[rng.integers(len(candidates))]
    else:
        bg = np.unravel_index(int(distance.argmax()), mask.shape)
    return tuple(int(c) for c in centroid), tuple(int(c) for c in bg)


def _gaussian(shape, point, sigma: float) -> np.ndarray:
    rows = np.arange(shape[0])[:, None] - point[0]
    cols = np.arange(shape[1])[None, :] - point[1]
    return np.exp(-(rows ** 2 + cols ** 2) / (2 * sigma ** 2)).astype(np.float32)


def point_prompt_heatmaps(foreground: np.ndarray, rng: np.random.Generator,
                          sigma: float = DEFAULT_HEATMAP_SIGMA) -> np.ndarray:
    """Two channels (2, *foreground.shape): Gaussian heat maps of each slice's foreground and background
    point (first axis = slices). ``foreground`` is a 3-D boolean array."""
    heatmaps = np.zeros((PROMPT_CHANNELS, *foreground.shape), dtype=np.float32)
    for index in range(foreground.shape[0]):
        prompts = slice_point_prompts(foreground[index], rng)
        if prompts is None:
            continue
        fg, bg = prompts
        heatmaps[0, index] = _gaussian(foreground.shape[1:], fg, sigma)
        if bg is not None:
            heatmaps[1, index] = _gaussian(foreground.shape[1:], bg, sigma)
    return heatmaps


def slice_box(mask: np.ndarray):
    """(row0, col0, row1, col1), inclusive, of a 2-D mask's foreground; None when empty (vanilla SAM's box)."""
    where = np.argwhere(mask)
    if not len(where):
        return None
    (r0, c0), (r1, c1) = where.min(0), where.max(0)
    return int(r0), int(c0), int(r1), int(c1)


def sam_slice_prompts(foreground: np.ndarray, rng: np.random.Generator, use_box: bool = False) -> list:
    """Per slice of a 3-D mask: {"points": [fg, bg], "labels": [1, 0]} (CalSAM) or {"box": ...} (vanilla
    SAM), None for slices with empty ground truth."""
    prompts = []
    for mask in foreground:
        if use_box:
            box = slice_box(mask)
            prompts.append(None if box is None else {"box": box})
            continue
        points = slice_point_prompts(mask, rng)
        if points is None:
            prompts.append(None)
            continue
        fg, bg = points
        prompts.append({"points": [list(fg)] + ([list(bg)] if bg is not None else []),
                        "labels": [1] + ([0] if bg is not None else [])})
    return prompts


SAM_PROMPT_CHANNELS = 3  # foreground point, background point, box


def sam_prompt_maps(foreground: np.ndarray, rng: np.random.Generator, use_box: bool = False) -> np.ndarray:
    """The prompts of :func:`sam_slice_prompts` as (3, *foreground.shape) maps — one-hot foreground and
    background points, a filled box — so that they travel with the image through nnU-Net's predictor
    (and its mirroring) as extra input channels."""
    maps = np.zeros((SAM_PROMPT_CHANNELS, *foreground.shape), dtype=np.float32)
    for index, prompt in enumerate(sam_slice_prompts(foreground, rng, use_box)):
        if prompt is None:
            continue
        if "box" in prompt:
            r0, c0, r1, c1 = prompt["box"]
            maps[2, index, r0:r1 + 1, c0:c1 + 1] = 1
            continue
        for (row, col), label in zip(prompt["points"], prompt["labels"]):
            maps[0 if label == 1 else 1, index, row, col] = 1
    return maps
