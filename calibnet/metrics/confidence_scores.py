"""The per-case scores of ``confidence.json`` and the direction each one is read in (DESIGN §7).

Every score a stage writes is declared here, next to what it is held to: a *confidence* (higher = the
segmentation is more likely right), an *uncertainty* (higher = more likely wrong; negated before ranking)
or *not a score* (a count or a decision rate, never ranked). Failure detection ranks only declared scores,
so a new score is oriented where it is introduced, not guessed from its name downstream.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from calibnet.metrics.entropy import binary_entropy, normalised_entropy

CONFIDENCE = "confidence"
UNCERTAINTY = "uncertainty"
NOT_A_SCORE = "not a score"


@dataclass(frozen=True)
class ScoreKind:
    direction: str  # CONFIDENCE, UNCERTAINTY or NOT_A_SCORE
    quality: str = "DSC"  # the per-case quality the score is held to: "DSC" or "NSD" (NSD@1mm)
    estimates_quality: bool = False  # the score predicts the quality itself, so MAE |score − quality| means something

    @property
    def ranked(self) -> bool:
        return self.direction != NOT_A_SCORE

    @property
    def arrow(self) -> str:
        """How the report shows the direction: ↑ higher = more confident, ↓ higher = more uncertain."""
        return {CONFIDENCE: "↑ confidence", UNCERTAINTY: "↓ uncertainty"}.get(self.direction, "not ranked")


_KINDS = (  # (full-match pattern, kind); first match wins
    (r"mean_max_probability_foreground", ScoreKind(CONFIDENCE)),
    (r"entropy_foreground", ScoreKind(UNCERTAINTY)),
    (r"predicted_foreground_voxels", ScoreKind(NOT_A_SCORE)),
    # MC-dropout baselines of the confidence-prediction paper, N samples in the name
    (r"mc_dice_agreement_n\d+", ScoreKind(CONFIDENCE)),
    (r"mc_nsd_agreement_n\d+", ScoreKind(CONFIDENCE, "NSD")),
    (r"mc_mean_entropy_n\d+", ScoreKind(UNCERTAINTY)),
    # names written before the N was part of the score (read so that older runs still evaluate)
    (r"mc_score_agreement_dice", ScoreKind(CONFIDENCE)),
    (r"mc_score_agreement_nsd", ScoreKind(CONFIDENCE, "NSD")),
    (r"mc_mean_entropy", ScoreKind(UNCERTAINTY)),
    (r"mc_samples", ScoreKind(NOT_A_SCORE)),
    # confidence heads: predicted volumetric Dice and NSD@1mm
    (r".+_predicted_dice", ScoreKind(CONFIDENCE, "DSC", estimates_quality=True)),
    (r".+_predicted_nsd", ScoreKind(CONFIDENCE, "NSD", estimates_quality=True)),
    # MedSAM-U: mean UGMP uncertainty; the fraction of slices whose UGPA prompts were kept is a decision rate
    (r"ugmp_mean_uncertainty", ScoreKind(UNCERTAINTY)),
    (r"ugpa_accepted_fraction", ScoreKind(NOT_A_SCORE)),
)


def score_kind(name: str) -> ScoreKind | None:
    """The declared kind of a confidence.json score, or None for a name calibnet does not know."""
    return next((kind for pattern, kind in _KINDS if re.fullmatch(pattern, name)), None)


def as_confidence(name: str, values) -> np.ndarray:
    """Values of score ``name`` oriented so that higher = more confident (uncertainties negated)."""
    kind = score_kind(name)
    if kind is None or not kind.ranked:
        raise ValueError(f"{name!r} is not a declared confidence or uncertainty score")
    values = np.asarray(values, float)
    return -values if kind.direction == UNCERTAINTY else values


def case_confidence(probabilities: np.ndarray, regions: bool) -> dict:
    """The scores of one prediction's (C, *spatial) probabilities, as calibnet's predictions write them to
    confidence.json: ``mean_max_probability_foreground`` (mean max_c p_c over the predicted foreground, over all
    voxels when nothing is predicted), ``entropy_foreground`` (mean entropy there, normalised by log C; binary
    entropy of the first region for region datasets) and ``predicted_foreground_voxels``. calib_evaluate scores
    external predictions with it, calibnet's prediction writes it."""
    p = probabilities.astype(np.float32)
    if regions:
        foreground, confidence, entropy = p[0] > 0.5, np.maximum(p[0], 1 - p[0]), binary_entropy(p[0])
    else:
        foreground, confidence, entropy = p.argmax(0) > 0, p.max(0), normalised_entropy(p)
    n_foreground = int(foreground.sum())
    where = foreground if n_foreground else np.ones_like(foreground)
    return {"mean_max_probability_foreground": float(confidence[where].mean()),
            "entropy_foreground": float(entropy[where].mean()),
            "predicted_foreground_voxels": n_foreground}
