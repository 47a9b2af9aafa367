"""Failure detection from image-level confidence scores (DESIGN §7; the confidence-prediction paper).

Risk = 1 − DSC (0–1 scale; 1 − NSD for scores of surface quality). AURC = mean over coverage levels k = 1..n of
the mean risk of the k most confident cases; eAURC = AURC − AURC of the oracle ranking (by true risk), so a
perfect score has 0. The confidence given here is always "higher = more confident": uncertainties are negated
by the caller (``calibnet.metrics.confidence_scores.as_confidence``).

Ties: cases with equal confidence cannot be ordered by the score, so each of them carries the mean risk of its
block of tied cases before the cumulative mean (the expected AURC over all orders of the block, which
makes AURC independent of the order the cases come in; identical to the plain definition without ties).
"""
from __future__ import annotations

import numpy as np
from scipy import stats


def risk_coverage(confidence: np.ndarray, risk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Coverage k/n and the mean risk of the k most confident cases, k = 1..n; tied cases share the mean
    risk of their block."""
    confidence, risk = np.asarray(confidence, float), np.asarray(risk, float)
    order = np.argsort(-confidence, kind="stable")
    sorted_confidence, risks = confidence[order], risk[order]
    _, block, size = np.unique(sorted_confidence, return_inverse=True, return_counts=True)
    risks = (np.bincount(block, risks) / size)[block]
    k = np.arange(1, len(risks) + 1)
    return k / len(risks), np.cumsum(risks) / k


def aurc(confidence: np.ndarray, risk: np.ndarray) -> float:
    """Area under the risk–coverage curve (mean over the n coverage levels)."""
    return float(np.mean(risk_coverage(confidence, risk)[1]))


def eaurc(confidence: np.ndarray, risk: np.ndarray) -> float:
    """AURC minus the AURC of the oracle ranking by true risk (0 for a perfect score)."""
    risk = np.asarray(risk, float)
    return aurc(confidence, risk) - aurc(-risk, risk)


def failure_detection_metrics(score: np.ndarray, quality: np.ndarray, estimates_quality: bool = False) -> dict:
    """Pearson r(score, quality), AURC, eAURC with risk = 1 − quality (DSC, or NSD for NSD scores), and
    MAE |score − quality| when the score predicts the quality itself (a confidence head's output).
    ``score`` is a confidence (higher = more confident): negate uncertainties first."""
    score, quality = np.asarray(score, float), np.asarray(quality, float)
    risk = 1 - quality
    pearson = float(stats.pearsonr(score, quality).statistic) \
        if len(score) > 2 and score.std() > 0 and quality.std() > 0 else float("nan")
    result = {"pearson_r": pearson, "AURC": aurc(score, risk), "eAURC": eaurc(score, risk), "n": int(len(score))}
    if estimates_quality:
        result["MAE"] = float(np.mean(np.abs(score - quality)))
    return result
