"""UGMP and UGPA (MedSAM-U Eqs. 4–14) on fixed predictions, against hand computations."""
import numpy as np
import pytest

from calibnet.uncertainty_prompting import (UGMPResult, binary_entropy, choose, jittered_boxes,
                                            most_uncertain_points, run_ugpa, ugmp, uncertainty_box)


def test_ugmp_mean_and_entropy_by_hand():
    predictions = [np.array([[0.2, 1.0], [0.0, 0.5]]), np.array([[0.6, 1.0], [0.0, 0.5]])]
    result = ugmp(predictions)
    np.testing.assert_allclose(result.probability, [[0.4, 1.0], [0.0, 0.5]])
    h = -(0.4 * np.log2(0.4) + 0.6 * np.log2(0.6))  # 0.97095 bits
    np.testing.assert_allclose(result.uncertainty, [[h, 0.0], [0.0, 1.0]], atol=1e-9)
    assert binary_entropy(np.array([0.5]))[0] == pytest.approx(1.0)


def test_jittered_boxes_are_seeded_ordered_and_inside():
    boxes = jittered_boxes((10, 10, 20, 30), 5, 8.0, (32, 40), np.random.default_rng(3))
    assert boxes == jittered_boxes((10, 10, 20, 30), 5, 8.0, (32, 40), np.random.default_rng(3))
    for r0, c0, r1, c1 in boxes:
        assert 0 <= r0 <= r1 <= 31 and 0 <= c0 <= c1 <= 39
    assert jittered_boxes((10, 10, 20, 30), 2, 0.0, (32, 40), np.random.default_rng(0)) == [(10, 10, 20, 30)] * 2


def test_uncertainty_box_and_top_k_points():
    uncertainty = np.zeros((10, 12))
    uncertainty[2, 3], uncertainty[7, 9], uncertainty[5, 5] = 0.9, 0.8, 0.3
    assert uncertainty_box(uncertainty, 0.5) == (2.0, 3.0, 7.0, 9.0)
    assert uncertainty_box(uncertainty, 0.95) is None
    assert most_uncertain_points(uncertainty, 2) == [(2.0, 3.0), (7.0, 9.0)]


def _result(p):
    p = np.asarray(p, float)
    return UGMPResult(p, binary_entropy(p))


def test_choose_keeps_the_lower_uncertainty_result_both_ways():
    sure, unsure = _result([[0.99, 0.01]]), _result([[0.6, 0.4]])
    accepted = choose(unsure, sure)
    assert accepted.accepted and accepted.probability is sure.probability
    kept = choose(sure, unsure)
    assert not kept.accepted and kept.probability is sure.probability
    roi = choose(_result([[0.9, 0.5]]), _result([[0.6, 0.0]]), compare_on="roi")
    assert not roi.accepted  # ROI = both pixels: (0.47 + 1.0)/2 initial vs (0.97 + 0)/2 adapted
    with pytest.raises(ValueError):
        choose(sure, unsure, compare_on="volume")


@pytest.mark.parametrize("more_points_help", [True, False])
def test_ugpa_reruns_with_adapted_prompts_and_accepts_only_improvements(more_points_help):
    shape = (16, 16)
    calls = []

    def predict(box, points, labels):
        calls.append((box, list(points), list(labels)))
        adapted = len(points) > 1
        sharp = adapted == more_points_help
        p = np.full(shape, 0.02)
        p[4:12, 4:12] = 0.98 if sharp else 0.55
        return p

    result = run_ugpa(predict, (4, 4, 11, 11), [(8.0, 8.0)], [1], shape, np.random.default_rng(0), n=3, k=2,
                      edge_threshold=0.1)
    assert len(calls) == 3 + 2  # N initial boxes, then K adapted boxes
    assert all(len(points) == 1 for _, points, _ in calls[:3]) and all(len(points) == 3 for _, points, _ in calls[3:])
    # the added points are the most uncertain pixels, labelled by the initial mean prediction
    assert all(labels[0] == 1 and len(labels) == 3 for _, _, labels in calls[3:])
    assert result.accepted is more_points_help
    expected = result.adapted if more_points_help else result.initial
    np.testing.assert_array_equal(result.probability, expected.probability)


def test_ugpa_without_uncertain_pixels_keeps_the_ugmp_result():
    def predict(box, points, labels):
        return np.zeros((8, 8))

    result = run_ugpa(predict, (2, 2, 5, 5), [], [], (8, 8), np.random.default_rng(0))
    assert not result.accepted and result.adapted is None
    np.testing.assert_array_equal(result.probability, np.zeros((8, 8)))
