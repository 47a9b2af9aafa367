"""MedSAM-U's uncertainty-guided prompting on one 2-D slice (MedSAM-U §III-B/C, Eqs. 4–14), independent of
the model: the caller supplies ``predict(box, points, labels) -> probability map`` for one box (or None)
and a labelled point set.

- UGMP (Eqs. 4–8): N boxes jittered around the initial box (each corner coordinate + δ, δ ~ N(0, σ) pixels),
  one prediction per box (with the same points), ȳ = their mean, Ū = the binary entropy of ȳ (bits).
- UGPA (Eqs. 9–14): the box enclosing the edge of the uncertainty map (the pixels where Ū exceeds
  ``edge_threshold`` — our reading of Edge(U)), re-jittered into K boxes; the K most uncertain pixels as
  extra foreground points; UGMP again gives (y*, U*); y* is kept only if its uncertainty is lower than Ū's
  (mean entropy over the slice, or over the ROI = where either prediction is foreground, ``compare_on``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_N_BOXES = 3
DEFAULT_SIGMA = 5.0  # pixels; the paper does not state it
DEFAULT_TOP_K = 3
DEFAULT_EDGE_THRESHOLD = 0.5  # bits; the paper does not state how Edge(U) is found


@dataclass
class UGMPResult:
    probability: np.ndarray  # ȳ, (Y, X)
    uncertainty: np.ndarray  # Ū, binary entropy in bits, (Y, X)


@dataclass
class UGPAResult:
    probability: np.ndarray  # ŷ: y* when accepted, else ȳ
    uncertainty: np.ndarray  # the uncertainty map that goes with ŷ
    accepted: bool  # whether the adapted prompts lowered the uncertainty
    initial: UGMPResult
    adapted: UGMPResult | None


def binary_entropy(probability: np.ndarray) -> np.ndarray:
    """H(p) = −p log₂ p − (1 − p) log₂(1 − p), 0 at p ∈ {0, 1}."""
    p = np.clip(np.asarray(probability, float), 1e-12, 1 - 1e-12)
    return -(p * np.log2(p) + (1 - p) * np.log2(1 - p))


def jittered_boxes(box, n: int, sigma: float, shape, rng: np.random.Generator) -> list:
    """Eq. 4: ``n`` copies of (row0, col0, row1, col1) with every coordinate moved by δ ~ N(0, σ), kept
    ordered and inside the slice."""
    boxes = []
    for _ in range(n):
        r0, c0, r1, c1 = np.asarray(box, float) + rng.normal(0, sigma, size=4)
        r0, r1 = sorted((float(np.clip(r0, 0, shape[0] - 1)), float(np.clip(r1, 0, shape[0] - 1))))
        c0, c1 = sorted((float(np.clip(c0, 0, shape[1] - 1)), float(np.clip(c1, 0, shape[1] - 1))))
        boxes.append((r0, c0, r1, c1))
    return boxes


def ugmp(predictions: list) -> UGMPResult:
    """Eqs. 6–7: the mean of the N probability maps and the entropy of that mean."""
    mean = np.mean(np.stack([np.asarray(p, float) for p in predictions]), axis=0)
    return UGMPResult(mean, binary_entropy(mean))


def uncertainty_box(uncertainty: np.ndarray, edge_threshold: float = DEFAULT_EDGE_THRESHOLD):
    """Eqs. 10–11: the smallest box enclosing every pixel of the uncertainty map above ``edge_threshold``;
    None when no pixel is."""
    where = np.argwhere(uncertainty > edge_threshold)
    if not len(where):
        return None
    (r0, c0), (r1, c1) = where.min(0), where.max(0)
    return float(r0), float(c0), float(r1), float(c1)


def most_uncertain_points(uncertainty: np.ndarray, k: int) -> list:
    """Eq. 12: the ``k`` pixels with the highest uncertainty, most uncertain first (ties: row-major order)."""
    order = np.argsort(-uncertainty.ravel(), kind="stable")[:k]
    return [(float(r), float(c)) for r, c in zip(*np.unravel_index(order, uncertainty.shape))]


def mean_uncertainty(result: UGMPResult, roi: np.ndarray | None = None) -> float:
    """Mean entropy over the slice, or over ``roi`` when given and not empty."""
    if roi is not None and roi.any():
        return float(result.uncertainty[roi].mean())
    return float(result.uncertainty.mean())


def run_ugmp(predict, boxes: list, points: list, labels: list) -> UGMPResult:
    """UGMP with the model: one prediction per box, each with the same points (one prediction when there
    is no box)."""
    return ugmp([predict(box, points, labels) for box in (boxes or [None])])


def adapt(predict, initial: UGMPResult, points: list, labels: list, shape, rng: np.random.Generator,
          sigma: float = DEFAULT_SIGMA, k: int = DEFAULT_TOP_K, edge_threshold: float = DEFAULT_EDGE_THRESHOLD,
          compare_on: str = "slice") -> UGPAResult:
    """UGPA from a UGMP result: the uncertainty box re-jittered into ``k`` boxes, the ``k`` most uncertain
    pixels added as point prompts — labelled foreground where ȳ ≥ 0.5, else background (our choice; the
    paper does not say) — then UGMP again, and Eq. 14."""
    adapted_box = uncertainty_box(initial.uncertainty, edge_threshold)
    if adapted_box is None:  # nothing uncertain: nothing to adapt
        return UGPAResult(initial.probability, initial.uncertainty, False, initial, None)
    extra = most_uncertain_points(initial.uncertainty, k)
    extra_labels = [int(initial.probability[int(r), int(c)] >= 0.5) for r, c in extra]
    boxes = jittered_boxes(adapted_box, k, sigma, shape, rng)
    adapted = run_ugmp(predict, boxes, list(points) + extra, list(labels) + extra_labels)
    return choose(initial, adapted, compare_on)


def run_ugpa(predict, box, points: list, labels: list, shape, rng: np.random.Generator, n: int = DEFAULT_N_BOXES,
             sigma: float = DEFAULT_SIGMA, k: int = DEFAULT_TOP_K, edge_threshold: float = DEFAULT_EDGE_THRESHOLD,
             compare_on: str = "slice") -> UGPAResult:
    """MedSAM-U from one initial box: UGMP over ``n`` boxes jittered around it, then UGPA."""
    initial = run_ugmp(predict, jittered_boxes(box, n, sigma, shape, rng), points, labels)
    return adapt(predict, initial, points, labels, shape, rng, sigma, k, edge_threshold, compare_on)


def choose(initial: UGMPResult, adapted: UGMPResult, compare_on: str = "slice") -> UGPAResult:
    """Eq. 14: ŷ = y* if Ū > U* else ȳ, uncertainties averaged over the slice or the foreground ROI."""
    if compare_on not in ("slice", "roi"):
        raise ValueError(f"compare_on must be 'slice' or 'roi', not {compare_on!r}")
    roi = (initial.probability > 0.5) | (adapted.probability > 0.5) if compare_on == "roi" else None
    accepted = mean_uncertainty(initial, roi) > mean_uncertainty(adapted, roi)
    chosen = adapted if accepted else initial
    return UGPAResult(chosen.probability, chosen.uncertainty, bool(accepted), initial, adapted)
