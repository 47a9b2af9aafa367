"""Calibration of voxel-wise predictions (DESIGN §7): the confidence is the predicted class probability
max_c p_c, a voxel is correct when argmax_c p_c equals its label. Binning is done once
(:func:`calibration_bins`); ECE, ACE and the reliability diagram are reductions of the same statistics.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

N_BINS = 15


@dataclass
class CalibrationBins:
    """Per-bin voxel count, mean confidence and accuracy (empty bins have count 0 and NaN means)."""
    edges: np.ndarray
    count: np.ndarray
    confidence: np.ndarray
    accuracy: np.ndarray

    def expected_calibration_error(self) -> float:
        """Σ_m |B_m|/n · |acc(B_m) − conf(B_m)| over non-empty bins."""
        used = self.count > 0
        n = self.count.sum()
        return float(np.sum(self.count[used] / n * np.abs(self.accuracy[used] - self.confidence[used]))) if n else 0.0


def calibration_bins(confidence: np.ndarray, correct: np.ndarray, n_bins: int = N_BINS,
                     equal_mass: bool = False) -> CalibrationBins:
    """Bin voxels by confidence: ``n_bins`` equal-width bins on [0, 1], or equal-mass bins (quantiles).

    Equal-mass bins never split voxels of equal confidence: each nominal bin edge (after every n/n_bins
    voxels in confidence order) moves to the nearer end of the block of tied confidences it falls in, so a
    voxel's bin depends on its value only, not on the order of the voxels (bins may then hold unequal
    counts, or none)."""
    confidence = np.asarray(confidence, np.float64).ravel()
    correct = np.asarray(correct, np.float64).ravel()
    if equal_mass and confidence.size:
        index, edges = _equal_mass_bins(confidence, n_bins)
    else:
        edges = np.linspace(0, 1, n_bins + 1)
        index = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, n_bins - 1)
    count = np.bincount(index, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(index, confidence, n_bins) / count
        accuracy = np.bincount(index, correct, n_bins) / count
    return CalibrationBins(edges, count, mean_confidence, accuracy)


def _equal_mass_bins(confidence: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """(bin of each voxel, edges) of the equal-mass bins of :func:`calibration_bins` without sorting every voxel:
    only the order statistics at the nominal cuts are selected (``np.partition``), tie blocks are counted."""
    n = confidence.size
    sizes = np.full(n_bins, n // n_bins) + (np.arange(n_bins) < n % n_bins)
    nominal = np.cumsum(sizes)[:-1]  # the positions array_split would cut at (in sorted order)
    kth = np.unique(np.minimum(nominal, n - 1))
    selected = np.partition(confidence, kth)
    at = selected[np.minimum(nominal, n - 1)]
    distinct = np.unique(at)
    below = np.cumsum(np.bincount(np.searchsorted(distinct, confidence, "right"), minlength=len(distinct) + 1))
    up_to = np.cumsum(np.bincount(np.searchsorted(distinct, confidence, "left"), minlength=len(distinct) + 1))
    where = np.searchsorted(distinct, at)
    start, end = below[where], up_to[where]  # sorted positions where each cut's block of ties starts and ends
    to_end = nominal - start > end - nominal
    cuts = np.where(to_end, end, start)
    # a voxel's bin = the cuts at or before its first sorted occurrence: cut at a block's start when v >= at,
    # at its end when v > at, i.e. v >= the next float above at
    thresholds = np.where(to_end, np.nextafter(at, np.inf), at)
    index = np.searchsorted(thresholds, confidence, "right")
    edges = np.array([confidence.min()] + [_order_statistic(selected, kth, c) if c < n else np.nan for c in cuts]
                     + [confidence.max()])
    return index, edges


def _order_statistic(selected: np.ndarray, kth: np.ndarray, position: int) -> float:
    """The value at ``position`` in sorted order of an array partitioned at the positions ``kth``."""
    block = np.searchsorted(kth, position, "right")  # kth[block - 1] <= position < kth[block]
    low = kth[block - 1] if block else -1
    if low == position:
        return selected[position]
    high = kth[block] if block < len(kth) else len(selected)
    return np.partition(selected[low + 1:high], position - low - 1)[position - low - 1]


def top_label(probabilities: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(confidence, correct) of class probabilities (C, N) against integer labels (N,)."""
    if not labels.size:
        return np.zeros(0), np.zeros(0, bool)
    return probabilities.max(0), probabilities.argmax(0) == labels


def brier_score(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Mean over foreground classes c of mean over voxels of (p_c − 1[y = c])²; (C, N) and (N,)."""
    scores = [np.mean((probabilities[c] - (labels == c)) ** 2) for c in range(1, probabilities.shape[0])]
    return float(np.mean(scores))


def calibration_metrics(probabilities: np.ndarray, labels: np.ndarray, n_bins: int = N_BINS) -> dict:
    """ECE (equal-width bins), ACE (equal-mass bins) and Brier of one case's ROI voxels."""
    return calibration_summary(probabilities, labels, n_bins)[0]


def calibration_summary(probabilities: np.ndarray, labels: np.ndarray, n_bins: int = N_BINS, top=None) -> tuple:
    """(ECE/ACE/Brier, equal-width CalibrationBins) of (C, N) probabilities against (N,) labels; NaN metrics
    and empty bins when there is no voxel. ``top``: their :func:`top_label` when already computed."""
    confidence, correct = top_label(probabilities, labels) if top is None else top
    confidence, correct = np.asarray(confidence, np.float64), np.asarray(correct, np.float64)  # once for both
    bins = calibration_bins(confidence, correct, n_bins)
    if not labels.size:
        return {"ECE": np.nan, "ACE": np.nan, "Brier": np.nan}, bins
    return ({"ECE": bins.expected_calibration_error(),
             "ACE": calibration_bins(confidence, correct, n_bins, equal_mass=True).expected_calibration_error(),
             "Brier": brier_score(probabilities, labels)}, bins)


def pool_bins(bins: list) -> CalibrationBins:
    """Equal-width bins of several cases merged exactly (counts and sums are additive)."""
    count = np.sum([b.count for b in bins], 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        confidence = np.nansum([b.confidence * b.count for b in bins], 0) / count
        accuracy = np.nansum([b.accuracy * b.count for b in bins], 0) / count
    return CalibrationBins(bins[0].edges, count, confidence, accuracy)
