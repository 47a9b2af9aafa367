"""UGMP and UGPA (MedSAM-U Eqs. 4–14) on fixed predictions, against hand computations."""
import numpy as np
import pytest

from calibnet.uncertainty_prompting import (UGMPResult, adapt, binary_entropy, choose, default_min_distance,
                                            jitter_rng, jittered_boxes, most_uncertain_points, run_ugpa, ugmp,
                                            uncertainty_box)


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


def test_jitter_rng_differs_between_cases_and_settings_and_repeats_for_the_same_slice():
    def boxes(case, z, setting):
        return jittered_boxes((10, 10, 20, 30), 3, 5.0, (64, 64), jitter_rng(42, case, z, setting))

    assert boxes("case_a", 3, "own") == boxes("case_a", 3, "own")
    assert boxes("case_a", 3, "own") != boxes("case_b", 3, "own")  # same slice index, another case
    assert boxes("case_a", 3, "own") != boxes("case_a", 3, "3B0.5")
    assert boxes("case_a", 3, "own") != boxes("case_a", 4, "own")


def test_refinement_points_are_spread_by_the_minimum_distance():
    # a ridge of neighbours at the top: the plain top-3 would be (5, 5), (5, 6), (6, 5)
    u = np.zeros((20, 20))
    u[5, 5], u[5, 6], u[6, 5], u[5, 8], u[9, 5], u[5, 10], u[12, 12] = 1.0, 0.99, 0.98, 0.97, 0.9, 0.8, 0.5
    assert most_uncertain_points(u, 3, min_distance=1) == [(5.0, 5.0), (5.0, 6.0), (6.0, 5.0)]
    # by hand, min distance 5: (5, 5); then (5, 6), (6, 5), (5, 8) and (9, 5) lie within 1, 1, 3 and 4 of it,
    # (5, 10) at exactly 5 is allowed; then (12, 12), at 9.9 and 7.3 from the two chosen
    points = most_uncertain_points(u, 3, min_distance=5)
    assert points == [(5.0, 5.0), (5.0, 10.0), (12.0, 12.0)]
    for i, a in enumerate(points):
        for b in points[i + 1:]:
            assert np.hypot(a[0] - b[0], a[1] - b[1]) >= 5
    # min distance 15: every listed pixel lies within 15 of (5, 5) ((12, 12) at 9.9), so the next is the first
    # pixel in row-major order 15 away: row 11 needs |col - 5| >= sqrt(225 - 36) = 13.7, i.e. (11, 19); no
    # pixel of the 20 × 20 slice is 15 from both, so fewer than k points come back
    assert most_uncertain_points(u, 5, min_distance=15) == [(5.0, 5.0), (11.0, 19.0)]


def test_default_minimum_distance_follows_the_slice_size():
    assert default_min_distance((100, 60)) == pytest.approx(3.0)  # 5 % of the shorter side
    assert default_min_distance((10, 12)) == 1.0  # never below one pixel
    u = np.zeros((100, 60))
    u[10, 10], u[10, 11], u[12, 10], u[10, 13], u[50, 50] = 1.0, 0.9, 0.8, 0.7, 0.6
    # (10, 11) and (12, 10) lie 1 and 2 < 3 from (10, 10); (10, 13) is exactly 3 away
    assert most_uncertain_points(u, 3) == [(10.0, 10.0), (10.0, 13.0), (50.0, 50.0)]


def test_ugpa_refinement_points_are_spread_and_labelled_by_the_mean_prediction():
    """Documented rule: label 1 where ȳ >= 0.5 at the point, else 0."""
    p = np.full((20, 20), 0.02)
    p[5, 5], p[5, 6], p[6, 5], p[5, 12], p[14, 5] = 0.5, 0.52, 0.45, 0.4, 0.7  # H: 1, .9988, .9928, .9710, .8813
    calls = []

    def predict(box, points, labels):
        calls.append((list(points), list(labels)))
        return p

    adapt(predict, _result(p), [(8.0, 8.0)], [1], p.shape, np.random.default_rng(0), k=3, min_distance=5)
    assert len(calls) == 3
    for points, labels in calls:
        assert points == [(8.0, 8.0), (5.0, 5.0), (5.0, 12.0), (14.0, 5.0)]
        assert labels == [1, 1, 0, 1]  # ȳ = 0.5 → 1, 0.4 → 0, 0.7 → 1
        assert labels[1:] == [int(p[int(r), int(c)] >= 0.5) for r, c in points[1:]]
