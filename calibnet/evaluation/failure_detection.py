"""Failure detection from image-level confidence scores (DESIGN §7; the confidence-prediction paper).

Risk = 1 − DSC (0–1 scale; 1 − NSD for scores of surface quality). AURC = mean over coverage levels k = 1..n of the mean risk of the k most
confident cases; eAURC = AURC − AURC of the oracle ranking (by true risk), so a perfect score has 0.
"""
from __future__ import annotations

import numpy as np
from scipy import stats


def risk_coverage(confidence: np.ndarray, risk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Coverage k/n and the mean risk of the k most confident cases, k = 1..n (ties: stable order)."""
    order = np.argsort(-np.asarray(confidence, float), kind="stable")
    risks = np.asarray(risk, float)[order]
    k = np.arange(1, len(risks) + 1)
    return k / len(risks), np.cumsum(risks) / k


def aurc(confidence: np.ndarray, risk: np.ndarray) -> float:
    return float(np.mean(risk_coverage(confidence, risk)[1]))


def eaurc(confidence: np.ndarray, risk: np.ndarray) -> float:
    risk = np.asarray(risk, float)
    return aurc(confidence, risk) - aurc(-risk, risk)


def failure_detection_metrics(score: np.ndarray, quality: np.ndarray, estimates_quality: bool = False) -> dict:
    """Pearson r(score, quality), AURC, eAURC with risk = 1 − quality (DSC, or NSD for NSD scores), and
    MAE |score − quality| when the score predicts the quality itself (a confidence head's output)."""
    score, quality = np.asarray(score, float), np.asarray(quality, float)
    risk = 1 - quality
    pearson = float(stats.pearsonr(score, quality).statistic) \
        if len(score) > 2 and score.std() > 0 and quality.std() > 0 else float("nan")
    result = {"pearson_r": pearson, "AURC": aurc(score, risk), "eAURC": eaurc(score, risk), "n": int(len(score))}
    if estimates_quality:
        result["MAE"] = float(np.mean(np.abs(score - quality)))
    return result
