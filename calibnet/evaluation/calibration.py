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
    """Bin voxels by confidence: ``n_bins`` equal-width bins on [0, 1], or equal-mass bins (quantiles)."""
    confidence = np.asarray(confidence, np.float64).ravel()
    correct = np.asarray(correct, np.float64).ravel()
    if equal_mass:
        order = np.argsort(confidence, kind="stable")
        groups = np.array_split(order, n_bins)
        edges = np.array([confidence[g[0]] if len(g) else np.nan for g in groups] + [confidence.max(initial=1.0)])
        index = np.empty(len(confidence), int)
        for i, g in enumerate(groups):
            index[g] = i
    else:
        edges = np.linspace(0, 1, n_bins + 1)
        index = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, n_bins - 1)
    count = np.bincount(index, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(index, confidence, n_bins) / count
        accuracy = np.bincount(index, correct, n_bins) / count
    return CalibrationBins(edges, count, mean_confidence, accuracy)


def top_label(probabilities: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(confidence, correct) of class probabilities (C, N) against integer labels (N,)."""
    return probabilities.max(0), probabilities.argmax(0) == labels


def brier_score(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Mean over foreground classes c of mean over voxels of (p_c − 1[y = c])²; (C, N) and (N,)."""
    scores = [np.mean((probabilities[c] - (labels == c)) ** 2) for c in range(1, probabilities.shape[0])]
    return float(np.mean(scores))


def calibration_metrics(probabilities: np.ndarray, labels: np.ndarray, n_bins: int = N_BINS) -> dict:
    """ECE (equal-width bins), ACE (equal-mass bins) and Brier of one case's ROI voxels."""
    confidence, correct = top_label(probabilities, labels)
    return {"ECE": calibration_bins(confidence, correct, n_bins).expected_calibration_error(),
            "ACE": calibration_bins(confidence, correct, n_bins, equal_mass=True).expected_calibration_error(),
            "Brier": brier_score(probabilities, labels)}


def pool_bins(bins: list) -> CalibrationBins:
    """Equal-width bins of several cases merged exactly (counts and sums are additive)."""
    count = np.sum([b.count for b in bins], 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        confidence = np.nansum([b.confidence * b.count for b in bins], 0) / count
        accuracy = np.nansum([b.accuracy * b.count for b in bins], 0) / count
    return CalibrationBins(bins[0].edges, count, confidence, accuracy)
