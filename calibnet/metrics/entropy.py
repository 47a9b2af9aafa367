"""Entropy of predicted probabilities, normalised to [0, 1]: the one formula behind ``entropy_foreground``
(confidence.json), the MC-dropout ``mc_mean_entropy_n{N}`` and MedSAM-U's uncertainty Ū (bits).

Both functions take a NumPy array or a torch tensor and compute in its precision. Probabilities are clipped
away from 0 (and from 1 for the binary entropy) so that p·log p is 0 at p = 0 rather than NaN: by
ε = 1e-7 in float32 or lower (the smallest round ε for which 1 − ε < 1 there) and by 1e-12 in float64.
NumPy input of any other dtype is computed in float64.
"""
from __future__ import annotations

import numpy as np
import torch

FLOAT32_EPS = 1e-7
FLOAT64_EPS = 1e-12


def _prepared(probabilities):
    """(probabilities as a float array or tensor, ε of its precision)."""
    if isinstance(probabilities, torch.Tensor):
        return probabilities, FLOAT64_EPS if probabilities.dtype == torch.float64 else FLOAT32_EPS
    p = np.asarray(probabilities)
    if p.dtype not in (np.float16, np.float32):
        p = p.astype(np.float64)
    return p, FLOAT64_EPS if p.dtype == np.float64 else FLOAT32_EPS


def _clip(p, low: float, high: float):
    return p.clamp(low, high) if isinstance(p, torch.Tensor) else np.clip(p, low, high)


def _log(p):
    return p.log() if isinstance(p, torch.Tensor) else np.log(p)


def normalised_entropy(probabilities, axis: int = 0):
    """H(p) / log C of class probabilities along ``axis`` (C = its length): 0 for a one-hot vector, 1 for the
    uniform one. ``-(p · log max(p, ε)).sum(axis) / log C``."""
    p, eps = _prepared(probabilities)
    return -(p * _log(_clip(p, eps, 1))).sum(axis) / np.log(p.shape[axis])


def binary_entropy(probability):
    """H(p) / log 2 = −p log₂ p − (1 − p) log₂(1 − p) element-wise (bits, in [0, 1]), p clipped to [ε, 1 − ε]."""
    p, eps = _prepared(probability)
    q = _clip(p, eps, 1 - eps)
    return -(q * _log(q) + (1 - q) * _log(1 - q)) / np.log(2)
