"""Per-case segmentation metrics (DESIGN §7): DSC, IoU, HD95 and NSD at a tolerance, one mask pair at a
time, with the surface distances computed once (MONAI's edge and distance utilities) and reduced twice.

Conventions: both masks empty → DSC = IoU = NSD = 1, HD95 = 0; exactly one empty → DSC = IoU = NSD = 0 and
HD95 = the image diagonal in mm. HD95 is the larger of the two directed 95th percentiles (as MONAI's
``compute_hausdorff_distance(percentile=95)``); NSD is the fraction of both surfaces within the tolerance
(as MONAI's ``compute_surface_dice`` without sub-voxels).
"""
from __future__ import annotations

import numpy as np
from monai.metrics.utils import get_mask_edges, get_surface_distance

DEFAULT_NSD_TOLERANCE_MM = 1.0


def overlap_metrics(prediction: np.ndarray, truth: np.ndarray) -> dict:
    """DSC and IoU of two boolean masks."""
    intersection = np.logical_and(prediction, truth).sum()
    total = prediction.sum() + truth.sum()
    if total == 0:
        return {"DSC": 1.0, "IoU": 1.0}
    return {"DSC": float(2 * intersection / total), "IoU": float(intersection / (total - intersection))}


def surface_distances_mm(prediction: np.ndarray, truth: np.ndarray, spacing_mm) -> tuple[np.ndarray, np.ndarray]:
    """Distances (mm) from each surface voxel of ``prediction`` to the surface of ``truth`` and back."""
    edges_prediction, edges_truth = get_mask_edges(prediction, truth, crop=True)  # numpy in, numpy out
    return (np.asarray(get_surface_distance(edges_prediction, edges_truth, spacing=tuple(spacing_mm))),
            np.asarray(get_surface_distance(edges_truth, edges_prediction, spacing=tuple(spacing_mm))))


def case_metrics(prediction: np.ndarray, truth: np.ndarray, spacing_mm,
                 nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM, image_shape=None) -> dict:
    """DSC, IoU, HD95 (mm) and NSD@tolerance of one pair of boolean masks (array axis order = spacing order);
    ``image_shape``: the whole image's, when the masks are a crop holding all their foreground (for the
    diagonal of one empty mask)."""
    prediction, truth = prediction.astype(bool, copy=False), truth.astype(bool, copy=False)
    metrics = overlap_metrics(prediction, truth)
    nsd_name = f"NSD@{nsd_tolerance_mm:g}mm"
    if not prediction.any() and not truth.any():
        return {**metrics, "HD95": 0.0, nsd_name: 1.0}
    if not prediction.any() or not truth.any():
        shape = truth.shape if image_shape is None else image_shape
        diagonal = float(np.sqrt(np.sum((np.array(shape) * np.asarray(spacing_mm, float)) ** 2)))
        return {**metrics, "HD95": diagonal, nsd_name: 0.0}
    to_truth, to_prediction = surface_distances_mm(prediction, truth, spacing_mm)
    hd95 = max(np.percentile(to_truth, 95), np.percentile(to_prediction, 95))
    within = (to_truth <= nsd_tolerance_mm).sum() + (to_prediction <= nsd_tolerance_mm).sum()
    return {**metrics, "HD95": float(hd95), nsd_name: float(within / (len(to_truth) + len(to_prediction)))}
