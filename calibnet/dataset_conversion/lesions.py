"""Irregular lesions for the synthetic benchmark.

A lesion is a randomly oriented ellipsoid whose boundary is perturbed by smooth noise, so shapes are
lobulated rather than spheres. Two label modes:

- ``lesion``: 1–4 white-matter lesions of varied size (label 1), like MS / stroke lesion datasets;
- ``brats``: one glioma-like tumour with nested compartments, BraTS style — label 1 edema (SNFH),
  2 necrotic / non-enhancing core, 3 enhancing rim — so that whole tumour ⊃ tumour core ⊃ enhancing.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from calibnet.dataset_conversion.mni_anatomy import BenchmarkGrid, _rotation_matrix

LABEL_MODES = ("lesion", "brats")

# label value -> name, per mode (nnU-Net `labels`, background included)
LABELS = {
    "lesion": {"background": 0, "lesion": 1},
    # nnU-Net regions, ordered so that each region's last label is the one written when it wins
    "brats": {"background": 0, "whole_tumor": [1, 2, 3], "tumor_core": [2, 3], "enhancing_tumor": [3]},
}
REGIONS_CLASS_ORDER = {"brats": [1, 2, 3]}
# label value -> tissue name used by the contrast model
LABEL_TISSUES = {"lesion": {1: "lesion"}, "brats": {1: "edema", 2: "necrosis", 3: "enhancing"}}


def irregular_blob(grid: BenchmarkGrid, center_vox: np.ndarray, radius_mm: float, rng: np.random.Generator,
                   irregularity: float = 0.35, elongation: float = 0.35) -> np.ndarray:
    """Boolean mask of one lobulated blob around ``center_vox`` with mean radius ``radius_mm``."""
    radius_vox = radius_mm / grid.spacing_mm
    axes = radius_vox * (1 + rng.uniform(-elongation, elongation, 3))
    reach = int(np.ceil(axes.max() * (1 + irregularity) + 2))
    low = np.maximum(np.round(center_vox).astype(int) - reach, 0)
    high = np.minimum(np.round(center_vox).astype(int) + reach + 1, grid.shape)
    mask = np.zeros(grid.shape, dtype=bool)
    if np.any(high <= low):
        return mask
    box = tuple(slice(lo, hi) for lo, hi in zip(low, high))
    coords = np.stack(np.meshgrid(*[np.arange(lo, hi) for lo, hi in zip(low, high)], indexing="ij"), axis=-1)
    rotation = _rotation_matrix(rng.uniform(0, np.pi, 3))
    local = (coords - center_vox) @ rotation
    distance = np.sqrt(np.sum((local / axes) ** 2, axis=-1))
    noise = ndimage.gaussian_filter(rng.standard_normal(distance.shape), sigma=max(radius_vox / 2.5, 0.7))
    noise /= noise.std() + 1e-8
    mask[box] = distance + irregularity * noise < 1.0
    mask[tuple(np.round(center_vox).astype(int))] = True  # a lesion is never smaller than one voxel
    return mask


def _sample_center(candidates: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return candidates[rng.integers(len(candidates))].astype(float) + rng.uniform(-0.5, 0.5, 3)


def binary_lesions(tissue: dict, grid: BenchmarkGrid, rng: np.random.Generator,
                   count_range=(1, 4), radius_mm_range=(3.0, 14.0)) -> np.ndarray:
    """uint8 map with label 1 on 1–4 lesions centred in white matter (log-uniform radii)."""
    candidates = np.argwhere(tissue["wm"] > 0.5)
    if len(candidates) == 0:
        candidates = np.argwhere(tissue["brain"] > 0)
    label = np.zeros(grid.shape, dtype=np.uint8)
    for _ in range(rng.integers(count_range[0], count_range[1] + 1)):
        radius = float(np.exp(rng.uniform(np.log(radius_mm_range[0]), np.log(radius_mm_range[1]))))
        radius = max(radius, 1.2 * grid.spacing_mm)
        label[irregular_blob(grid, _sample_center(candidates, rng), radius, rng)] = 1
    label[tissue["brain"] == 0] = 0
    return label


def brats_tumor(tissue: dict, grid: BenchmarkGrid, rng: np.random.Generator,
                edema_radius_mm_range=(14.0, 30.0)) -> np.ndarray:
    """uint8 map of one nested tumour: 1 edema ⊃ (2 necrosis + 3 enhancing rim) = core."""
    candidates = np.argwhere((tissue["wm"] > 0.5) & (ndimage.distance_transform_edt(tissue["brain"]) > 3))
    if len(candidates) == 0:
        candidates = np.argwhere(tissue["brain"] > 0)
    center = _sample_center(candidates, rng)
    edema_radius = max(rng.uniform(*edema_radius_mm_range), 3 * grid.spacing_mm)
    edema = irregular_blob(grid, center, edema_radius, rng, irregularity=0.45)
    core_center = center + rng.uniform(-0.15, 0.15, 3) * edema_radius / grid.spacing_mm
    core = irregular_blob(grid, core_center, edema_radius * rng.uniform(0.35, 0.55), rng, irregularity=0.3) & edema
    rim_vox = max(1, int(round(rng.uniform(2.0, 4.0) / grid.spacing_mm)))
    necrosis = ndimage.binary_erosion(core, iterations=rim_vox)
    label = np.zeros(grid.shape, dtype=np.uint8)
    label[edema] = 1
    label[core] = 3
    label[necrosis] = 2
    label[tissue["brain"] == 0] = 0
    return label


def make_lesion_labels(mode: str, tissue: dict, grid: BenchmarkGrid, rng: np.random.Generator) -> np.ndarray:
    """Label map for ``mode`` (``lesion`` or ``brats``)."""
    if mode == "lesion":
        return binary_lesions(tissue, grid, rng)
    if mode == "brats":
        return brats_tumor(tissue, grid, rng)
    raise ValueError(f"unknown label mode {mode!r}; choose one of {', '.join(LABEL_MODES)}")
