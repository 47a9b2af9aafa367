"""MedSAM-U's uncertainty-guided prompting on one 2-D slice (MedSAM-U §III-B/C, Eqs. 4–14), independent of
the model: the caller supplies ``predict(box, points, labels) -> probability map`` for one box (or None)
and a labelled point set.

- UGMP (Eqs. 4–8): N boxes jittered around the initial box (each corner coordinate + δ, δ ~ N(0, σ) pixels),
  one prediction per box (with the same points), ȳ = their mean, Ū = the binary entropy of ȳ (bits).
- UGPA (Eqs. 9–14): the box enclosing the edge of the uncertainty map (the pixels where Ū exceeds
  ``edge_threshold`` — our reading of Edge(U)), re-jittered into K boxes; K refinement points — the most
  uncertain pixel, then each next most uncertain pixel at least ``min_distance`` pixels from those already
  chosen (:func:`most_uncertain_points`) — each labelled foreground where ȳ ≥ 0.5, else background
  (:func:`refinement_points`); UGMP again gives (y*, U*); y* is kept only if its uncertainty is lower than
  Ū's (mean entropy over the slice, or over the ROI = where either prediction is foreground, ``compare_on``).

The jitter of one slice is drawn from :func:`jitter_rng` (seed, case, slice, prompt setting), so cases never
share it and the same (case, slice, setting) always gets the same boxes.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from calibnet.metrics.entropy import binary_entropy  # Ū in bits, computed in float64 here

DEFAULT_N_BOXES = 3
DEFAULT_SIGMA = 5.0  # pixels; the paper does not state it
DEFAULT_TOP_K = 3
DEFAULT_EDGE_THRESHOLD = 0.5  # bits; the paper does not state how Edge(U) is found
# UGPA's refinement points lie at least this fraction of the slice's shorter side apart (ours; the paper's
# Eq. 12 takes the raw top-K pixels, which are usually neighbours on one ridge of the uncertainty map)
DEFAULT_POINT_SPACING = 0.05
JITTER_STREAM = zlib.crc32(b"ugmp-jitter")  # keeps the jitter apart from the prompt draws of prompt_rng


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


def jitter_rng(seed: int, case_key: str, slice_index: int, setting: str) -> np.random.Generator:
    """The generator of one slice's UGMP/UGPA box jitter: the same (seed, case, slice, prompt setting) always
    gives the same boxes, and different cases (or settings) of the same slice index different ones. Built
    like :func:`calibnet.prompt_quality.prompt_rng` (case and setting names by zlib.crc32), plus a stream tag
    so that the jitter is not a replay of that slice's prompt draws."""
    return np.random.default_rng([int(seed), zlib.crc32(str(case_key).encode()), int(slice_index),
                                  zlib.crc32(str(setting).encode()), JITTER_STREAM])


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


def default_min_distance(shape, spacing: float = DEFAULT_POINT_SPACING) -> float:
    """UGPA's minimum distance between refinement points on a slice of ``shape``: ``spacing`` × the shorter
    side, and never below 1 pixel (at 1 the rule is the plain top-K of Eq. 12)."""
    return max(1.0, float(spacing) * min(shape[:2]))


def most_uncertain_points(uncertainty: np.ndarray, k: int, min_distance: float | None = None) -> list:
    """Eq. 12, spread out: up to ``k`` pixels (row, col), most uncertain first. The first is the most
    uncertain pixel; each next one is the most uncertain pixel whose Euclidean distance to every pixel
    already chosen is at least ``min_distance`` (default :func:`default_min_distance` of the map's shape).
    Ties go to the first pixel in row-major order. Fewer than ``k`` points when the slice has no room for
    more; ``min_distance`` ≤ 1 gives the ``k`` most uncertain pixels as they are."""
    u = np.asarray(uncertainty, float)
    if min_distance is None:
        min_distance = default_min_distance(u.shape)
    if min_distance < 0:
        raise ValueError(f"min_distance must be >= 0, not {min_distance}")
    rows, cols = np.indices(u.shape)
    available = np.ones(u.shape, bool)
    points = []
    for _ in range(k):
        if not available.any():
            break
        r, c = np.unravel_index(int(np.argmax(np.where(available, u, -np.inf))), u.shape)
        points.append((float(r), float(c)))
        available &= (rows - r) ** 2 + (cols - c) ** 2 >= min_distance ** 2
        available[r, c] = False
    return points


def refinement_points(initial: UGMPResult, k: int, min_distance: float | None = None) -> tuple:
    """UGPA's extra point prompts (points, labels): the ``k`` spread-out most uncertain pixels of Ū
    (:func:`most_uncertain_points`), each labelled 1 (foreground) where UGMP's mean prediction ȳ at that
    pixel is ≥ 0.5 and 0 (background) otherwise — our rule; the paper does not say how they are labelled."""
    points = most_uncertain_points(initial.uncertainty, k, min_distance)
    labels = [int(initial.probability[int(r), int(c)] >= 0.5) for r, c in points]
    return points, labels


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
          compare_on: str = "slice", min_distance: float | None = None) -> UGPAResult:
    """UGPA from a UGMP result: the uncertainty box re-jittered into ``k`` boxes, up to ``k`` refinement
    points added to the slice's points — the most uncertain pixels at least ``min_distance`` apart, each
    labelled foreground (1) where ȳ ≥ 0.5, else background (0) (:func:`refinement_points`; our rule, the
    paper does not say) — then UGMP again, and Eq. 14."""
    adapted_box = uncertainty_box(initial.uncertainty, edge_threshold)
    if adapted_box is None:  # nothing uncertain: nothing to adapt
        return UGPAResult(initial.probability, initial.uncertainty, False, initial, None)
    extra, extra_labels = refinement_points(initial, k, min_distance)
    boxes = jittered_boxes(adapted_box, k, sigma, shape, rng)
    adapted = run_ugmp(predict, boxes, list(points) + extra, list(labels) + extra_labels)
    return choose(initial, adapted, compare_on)


def run_ugpa(predict, box, points: list, labels: list, shape, rng: np.random.Generator, n: int = DEFAULT_N_BOXES,
             sigma: float = DEFAULT_SIGMA, k: int = DEFAULT_TOP_K, edge_threshold: float = DEFAULT_EDGE_THRESHOLD,
             compare_on: str = "slice", min_distance: float | None = None) -> UGPAResult:
    """MedSAM-U from one initial box: UGMP over ``n`` boxes jittered around it, then UGPA."""
    initial = run_ugmp(predict, jittered_boxes(box, n, sigma, shape, rng), points, labels)
    return adapt(predict, initial, points, labels, shape, rng, sigma, k, edge_threshold, compare_on, min_distance)


def choose(initial: UGMPResult, adapted: UGMPResult, compare_on: str = "slice") -> UGPAResult:
    """Eq. 14: ŷ = y* if Ū > U* else ȳ, uncertainties averaged over the slice or the foreground ROI."""
    if compare_on not in ("slice", "roi"):
        raise ValueError(f"compare_on must be 'slice' or 'roi', not {compare_on!r}")
    roi = (initial.probability > 0.5) | (adapted.probability > 0.5) if compare_on == "roi" else None
    accepted = mean_uncertainty(initial, roi) > mean_uncertainty(adapted, roi)
    chosen = adapted if accepted else initial
    return UGPAResult(chosen.probability, chosen.uncertainty, bool(accepted), initial, adapted)
