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
