"""Evaluation metrics against hand-computed values and against MONAI's own metric functions."""
import numpy as np
import pytest
import torch
from monai.metrics import compute_hausdorff_distance, compute_surface_dice
from scipy import ndimage, stats

from calibnet.evaluation.calibration import brier_score, calibration_bins, calibration_metrics
from calibnet.evaluation.failure_detection import aurc, eaurc, failure_detection_metrics
from calibnet.evaluation.metrics import case_metrics
from calibnet.evaluation.posthoc import apply_dirichlet, apply_temperature, fit_dirichlet, fit_temperature, nll


def test_empty_mask_conventions():
    empty = np.zeros((4, 5, 6), bool)
    full = empty.copy()
    full[1, 1, 1] = True
    assert case_metrics(empty, empty, (2.0, 1.0, 1.0)) == {"DSC": 1.0, "IoU": 1.0, "HD95": 0.0, "NSD@1mm": 1.0}
    one_empty = case_metrics(full, empty, (2.0, 1.0, 1.0))
    assert one_empty["DSC"] == one_empty["IoU"] == one_empty["NSD@1mm"] == 0.0
    assert one_empty["HD95"] == pytest.approx(np.sqrt(8 ** 2 + 5 ** 2 + 6 ** 2))


def test_anisotropic_spacing_for_hd95_and_nsd():
    prediction, truth = np.zeros((8, 8, 8), bool), np.zeros((8, 8, 8), bool)
    prediction[2, 5, 5] = truth[4, 5, 5] = True
    metrics = case_metrics(prediction, truth, (3.0, 1.0, 1.0))  # 2 voxels along the 3 mm axis
    assert metrics["HD95"] == pytest.approx(6.0) and metrics["NSD@1mm"] == 0.0 and metrics["DSC"] == 0.0
    assert case_metrics(prediction, truth, (0.5, 1.0, 1.0))["NSD@1mm"] == 1.0  # 1 mm apart: within tolerance


def test_surface_metrics_agree_with_monai():
    rng = np.random.default_rng(0)
    truth = ndimage.gaussian_filter(rng.standard_normal((20, 24, 22)), 3) > 0.05
    prediction = ndimage.binary_dilation(truth, iterations=1) ^ (rng.random(truth.shape) > 0.97)
    spacing = (2.5, 0.8, 1.1)
    ours = case_metrics(prediction, truth, spacing)
    as_onehot = lambda m: torch.from_numpy(np.stack([~m, m]))[None].float()
    monai_hd95 = compute_hausdorff_distance(as_onehot(prediction), as_onehot(truth), percentile=95, spacing=spacing)
    monai_nsd = compute_surface_dice(as_onehot(prediction), as_onehot(truth), [1.0], spacing=spacing)
    assert ours["HD95"] == pytest.approx(float(monai_hd95), rel=1e-6)
    assert ours["NSD@1mm"] == pytest.approx(float(monai_nsd), rel=1e-6)
    intersection = (prediction & truth).sum()
    assert ours["DSC"] == pytest.approx(2 * intersection / (prediction.sum() + truth.sum()))


PROBABILITIES = np.array([[0.05, 0.95, 0.65, 0.35], [0.95, 0.05, 0.35, 0.65]])  # (C=2, N=4)
LABELS = np.array([1, 1, 0, 1])  # confidences .95 (right), .95 (wrong), .65 (right), .65 (right)


def test_ece_ace_brier_exact_values():
    metrics = calibration_metrics(PROBABILITIES, LABELS)
    assert metrics["ECE"] == pytest.approx(0.5 * abs(0.5 - 0.95) + 0.5 * abs(1 - 0.65))  # 0.4
    assert metrics["ACE"] == pytest.approx((0.05 + 0.95 + 0.35 + 0.35) / 4)  # one voxel per non-empty bin
    assert metrics["Brier"] == pytest.approx((0.05 ** 2 + 0.95 ** 2 + 0.35 ** 2 + 0.35 ** 2) / 4)
    bins = calibration_bins(PROBABILITIES.max(0), PROBABILITIES.argmax(0) == LABELS)
    assert bins.count.sum() == 4 and bins.count[14] == 2 and bins.count[9] == 2
    assert brier_score(np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([0, 1])) == 0.0


def test_aurc_and_eaurc_by_hand():
    confidence = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    dsc = np.array([0.9, 0.5, 0.8, 0.2, 0.7])
    risk = 1 - dsc
    assert aurc(confidence, risk) == pytest.approx((0.1 + 0.3 + 0.8 / 3 + 0.4 + 0.38) / 5)
    assert eaurc(confidence, risk) == pytest.approx((0.1 + 0.3 + 0.8 / 3 + 0.4 + 0.38) / 5 - 1.105 / 5)
    assert eaurc(dsc, risk) == pytest.approx(0.0)  # the oracle ranking
    metrics = failure_detection_metrics(confidence, dsc, estimates_quality=True)
    assert metrics["pearson_r"] == pytest.approx(stats.pearsonr(confidence, dsc).statistic)
    assert metrics["MAE"] == pytest.approx(np.mean(np.abs(confidence - dsc)))


def test_posthoc_fits_do_not_increase_the_nll_they_minimise():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 2000)
    logits = rng.standard_normal((3, 2000)) * 0.5
    logits[labels, np.arange(2000)] += 1.0
    overconfident = np.exp(4 * logits) / np.exp(4 * logits).sum(0)
    temperature = fit_temperature(overconfident, labels)
    assert temperature > 1
    assert nll(apply_temperature(overconfident, temperature), labels) <= nll(overconfident, labels)
    parameters = fit_dirichlet(overconfident, labels)
    assert nll(apply_dirichlet(overconfident, parameters), labels) <= nll(overconfident, labels)
