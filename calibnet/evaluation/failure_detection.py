"""Failure detection from image-level confidence scores (DESIGN §7; the confidence-prediction paper).

Risk = 1 − DSC (0–1 scale). AURC = mean over coverage levels k = 1..n of the mean risk of the k most
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


def failure_detection_metrics(score: np.ndarray, dsc: np.ndarray, estimates_dsc: bool = False) -> dict:
    """Pearson r(score, DSC), AURC, eAURC, and MAE |score − DSC| when the score estimates DSC."""
    score, dsc = np.asarray(score, float), np.asarray(dsc, float)
    risk = 1 - dsc
    pearson = float(stats.pearsonr(score, dsc).statistic) if len(score) > 2 and score.std() > 0 and dsc.std() > 0 \
        else float("nan")
    result = {"pearson_r": pearson, "AURC": aurc(score, risk), "eAURC": eaurc(score, risk), "n": int(len(score))}
    if estimates_dsc:
        result["MAE"] = float(np.mean(np.abs(score - dsc)))
    return result
