"""Evaluation metrics against hand-computed values and against MONAI's own metric functions."""
import numpy as np
import pandas as pd
import pytest
import torch
from monai.metrics import compute_hausdorff_distance, compute_surface_dice
from scipy import ndimage, stats

from calibnet.metrics.calibration import brier_score, calibration_bins, calibration_metrics
from calibnet.metrics.failure_detection import aurc, eaurc, failure_detection_metrics
from calibnet.metrics.segmentation import case_metrics
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
    # equal-mass bins never split the tied pairs: one bin of the two .95 voxels, one of the two .65 voxels
    assert metrics["ACE"] == pytest.approx(0.5 * abs(0.5 - 0.95) + 0.5 * abs(1 - 0.65))
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


def expected_aurc_over_orders(confidence, risk):
    """Brute force: AURC averaged over every order of the cases that the confidences allow (ties permuted)."""
    import itertools

    values = []
    for order in itertools.permutations(range(len(confidence))):
        if all(confidence[a] >= confidence[b] for a, b in zip(order, order[1:])):
            ranked = np.asarray(risk, float)[list(order)]
            values.append(np.mean(np.cumsum(ranked) / np.arange(1, len(ranked) + 1)))
    return np.mean(values)


def test_aurc_of_tied_confidences_is_the_block_mean_and_independent_of_case_order():
    confidence = np.array([1.0, 1.0, 0.5])
    risk = np.array([0.0, 1.0, 0.5])
    # the tied pair shares its mean risk 0.5: coverage 1, 2, 3 -> 0.5, 0.5, 0.5 (in stable order it was 0, .5, .5)
    assert aurc(confidence, risk) == pytest.approx(0.5, abs=1e-12)
    rng = np.random.default_rng(0)
    confidence = np.round(rng.random(7) * 3) / 3  # many ties, as MC score agreement of 1.0 gives
    risk = rng.random(7)
    expected = expected_aurc_over_orders(confidence, risk)
    for _ in range(20):
        order = rng.permutation(7)
        assert aurc(confidence[order], risk[order]) == pytest.approx(expected, abs=1e-12)
        assert eaurc(confidence[order], risk[order]) == pytest.approx(eaurc(confidence, risk), abs=1e-12)
    unique = rng.random(7)  # without ties: the plain definition
    ranked = risk[np.argsort(-unique)]
    assert aurc(unique, risk) == pytest.approx(np.mean(np.cumsum(ranked) / np.arange(1, 8)), abs=1e-12)


def test_ace_is_independent_of_voxel_order_when_ties_straddle_a_bin_edge():
    rng = np.random.default_rng(1)
    confidence = np.float16(rng.uniform(0.5, 1, 3000)).astype(np.float64)  # float16 maps: many exact ties
    confidence[:700] = 0.75  # a block of ties larger than one equal-mass bin (200 voxels)
    correct = rng.random(3000) < confidence
    reference = calibration_bins(confidence, correct, equal_mass=True)
    assert reference.count.sum() == 3000
    for _ in range(10):
        order = rng.permutation(3000)
        shuffled = calibration_bins(confidence[order], correct[order], equal_mass=True)
        assert shuffled.expected_calibration_error() == pytest.approx(reference.expected_calibration_error(),
                                                                      abs=1e-12)
        np.testing.assert_array_equal(shuffled.count, reference.count)
    # every tied block in exactly one bin
    index = np.searchsorted(np.cumsum(reference.count), np.arange(3000), "right")
    values = np.sort(confidence)
    for value in np.unique(values):
        assert len(set(index[values == value])) == 1


def _per_case_with_scores(dsc):
    n = len(dsc)
    return pd.DataFrame({"method": "m", "role": "target", "vendor": ["GE", "Philips"] * (n // 2), "DSC": dsc,
                         "conf_mean_max_probability_foreground": 0.5 + 0.5 * dsc,  # a confidence, monotone in DSC
                         "conf_entropy_foreground": 1 - dsc ** 2,  # an uncertainty, anti-monotone in DSC
                         "conf_ugpa_accepted_fraction": np.linspace(0, 1, n),  # a decision rate, not a score
                         "conf_predicted_foreground_voxels": np.arange(n)})


def test_uncertainties_are_negated_before_ranking_and_non_scores_are_not_ranked():
    from calibnet.evaluation.tables import failure_detection

    dsc = np.array([0.9, 0.1, 0.5, 0.7, 0.3, 0.8])
    table = failure_detection(_per_case_with_scores(dsc), "scanner")
    pooled = table[table.domain == "pooled"].set_index("score")
    assert set(pooled.index) == {"mean_max_probability_foreground", "entropy_foreground"}
    for score in pooled.index:  # a perfect ranking either way: eAURC 0, positive correlation of the oriented score
        assert pooled.loc[score, "eAURC"] == pytest.approx(0.0, abs=1e-12)
        assert pooled.loc[score, "pearson_r"] > 0.9
    assert pooled.loc["entropy_foreground", "direction"] == "↓ uncertainty"
    assert pooled.loc["mean_max_probability_foreground", "direction"] == "↑ confidence"
    oracle = aurc(dsc, 1 - dsc)
    assert pooled.loc["entropy_foreground", "AURC"] == pytest.approx(oracle, abs=1e-12)


def test_score_registry_declares_every_score_calibnet_writes():
    from calibnet.metrics.confidence_scores import CONFIDENCE, NOT_A_SCORE, UNCERTAINTY, as_confidence, score_kind

    expected = {"mean_max_probability_foreground": CONFIDENCE, "entropy_foreground": UNCERTAINTY,
                "predicted_foreground_voxels": NOT_A_SCORE, "mc_dice_agreement_n15": CONFIDENCE,
                "mc_nsd_agreement_n2": CONFIDENCE, "mc_mean_entropy_n15": UNCERTAINTY,
                "adversarial_head_predicted_dice": CONFIDENCE, "plain_head_predicted_nsd": CONFIDENCE,
                "ugmp_mean_uncertainty": UNCERTAINTY, "ugpa_accepted_fraction": NOT_A_SCORE}
    for name, direction in expected.items():
        assert score_kind(name).direction == direction, name
    assert score_kind("mc_nsd_agreement_n2").quality == "NSD" and score_kind("plain_head_predicted_nsd").estimates_quality
    assert score_kind("my_own_score") is None
    np.testing.assert_array_equal(as_confidence("entropy_foreground", [0.1, 0.4]), [-0.1, -0.4])
    with pytest.raises(ValueError):
        as_confidence("ugpa_accepted_fraction", [0.5])


def test_boundary_view_holds_the_voxels_within_5_mm_of_truth_or_prediction():
    from calibnet.evaluation.case_evaluation import calibration_rois, calibration_tasks, case_calibration
    from calibnet.runs import LabelTargets

    truth = np.zeros((1, 1, 21), np.int64)
    prediction = np.zeros_like(truth)
    truth[0, 0, 10] = 1  # 2 mm along the last axis: voxels 8..12 lie within 5 mm (0, 2, 4 mm)
    prediction[0, 0, 14] = 1  # adds 12..16
    targets = LabelTargets({"lesion": [1]}, regions=False)
    rois = calibration_rois(truth, prediction, [], targets, (1.0, 1.0, 2.0))
    np.testing.assert_array_equal(np.flatnonzero(rois["boundary"]), np.arange(8, 17))
    assert rois["ROI"].all()  # no input channel given: the whole image
    p = np.full((2, 1, 1, 21), 0.5)
    p[1, 0, 0, 8:17] = np.linspace(0.1, 0.9, 9)
    p[0] = 1 - p[1]
    metrics, bins = case_calibration(calibration_tasks(p, truth, targets), rois)
    inside = p[:, 0, 0, 8:17]
    assert metrics["ECE_boundary"] == pytest.approx(calibration_metrics(inside, truth[0, 0, 8:17])["ECE"])
    assert metrics["ECE"] == pytest.approx(calibration_metrics(p.reshape(2, -1), truth.ravel())["ECE"])
    assert bins["boundary"].count.sum() == 9 and bins["ROI"].count.sum() == 21
    empty = calibration_rois(np.zeros_like(truth), np.zeros_like(truth), [], targets, (1.0, 1.0, 2.0))
    assert not empty["boundary"].any()
    assert np.isnan(case_calibration(calibration_tasks(p, np.zeros_like(truth), targets), empty)[0]["ECE_boundary"])


def test_region_datasets_are_calibrated_on_every_region():
    from calibnet.evaluation.case_evaluation import calibration_tasks, case_calibration
    from calibnet.runs import LabelTargets

    truth = np.array([0, 1, 2, 2, 0, 1])  # regions: whole = {1, 2}, core = {2}
    targets = LabelTargets({"whole": [1, 2], "core": [2]}, regions=True)
    sigmoid = np.array([[0.2, 0.9, 0.8, 0.6, 0.4, 0.7], [0.1, 0.3, 0.9, 0.2, 0.1, 0.6]])
    rois = {"ROI": np.ones(6, bool), "boundary": np.ones(6, bool)}
    metrics, _ = case_calibration(calibration_tasks(sigmoid, truth, targets), rois)
    expected = {name: calibration_metrics(np.stack([1 - sigmoid[i], sigmoid[i]]), np.isin(truth, values).astype(int))
                for i, (name, values) in enumerate(targets.masks.items())}
    for metric in ("ECE", "ACE", "Brier"):
        assert metrics[f"{metric}_core"] == pytest.approx(expected["core"][metric])
        assert metrics[metric] == pytest.approx((expected["whole"][metric] + expected["core"][metric]) / 2)
    assert metrics["Brier_core"] == pytest.approx(np.mean((sigmoid[1] - (truth == 2)) ** 2))


def test_significance_stars_labels_and_baseline_pool():
    from calibnet.evaluation.tables import significance, stars

    assert (stars(0.005), stars(0.03), stars(0.2), stars(float("nan"))) == ("**", "*", "", "")
    rng = np.random.default_rng(0)
    rows = []
    for method, shift in (("nnunet", 0.0), ("calunet", 0.05), ("samft", -0.3), ("samft [3P]", 0.4)):
        for case in range(12):
            a, b = 0.5 + shift + 0.01 * rng.standard_normal(), 0.4 + shift + 0.01 * rng.standard_normal()
            rows.append({"method": method, "role": "target", "case_id": f"c{case}", "fold": 0, "seed": 42,
                         "DSC_a": a, "DSC_b": b, "DSC": (a + b) / 2})
    table = significance(pd.DataFrame(rows))
    assert set(table["metric"]) == {"DSC", "DSC_a", "DSC_b"}  # multi-label: each label and the mean
    assert set(table["baseline"]) == {"nnunet"}  # the prompt variant, although best, is no baseline
    calunet = table[(table.metric == "DSC") & (table.method == "calunet")].iloc[0]
    assert calunet["significant"] == "**" and calunet["over"] == "cases" and calunet["n"] == 12
    assert calunet["t_test_p"] == pytest.approx(stats.ttest_rel(
        [r["DSC"] for r in rows if r["method"] == "calunet"], [r["DSC"] for r in rows if r["method"] == "nnunet"]).pvalue)


def test_runs_that_differ_in_configuration_or_options_get_rows_of_their_own(tmp_path):
    from calibnet.runs import Run, run_labels

    def run(name, method, configuration, **extra):
        return Run(tmp_path / name, {"spec": {"method": method, "configuration": configuration, "fold": 0, "seed": 42},
                                     "loss_options": {}, "network_options": {"seed": 42}, **extra})

    runs = [run("a", "nnunet", "2d"), run("b", "nnunet", "3d_fullres"), run("c", "calunet", "2d"),
            run("d", "calunet", "2d"), run("e", "calsam", "2d", loss_options={"lambda_fip": 0.3}),
            run("f", "calsam", "2d", loss_options={"lambda_fip": 0.1})]
    labels = run_labels(runs)
    assert labels[tmp_path / "a"] == "nnunet (2d)" and labels[tmp_path / "b"] == "nnunet (3d_fullres)"
    assert labels[tmp_path / "c"] == labels[tmp_path / "d"] == "calunet"  # the same model on two folders: one row
    assert labels[tmp_path / "e"] == "calsam (lambda_fip=0.3)" and labels[tmp_path / "f"] == "calsam (lambda_fip=0.1)"


def test_ablation_tables_are_not_repeated_for_the_same_methods():
    from calibnet.evaluation.report import ablation_tables

    rows = [{"method": m, "role": "target", "DSC": d, "HD95": 1.0, "ECE": 0.1}
            for m, d in (("samft", 0.5), ("calsam", 0.6), ("samft_focal", 0.55))]
    tables = ablation_tables(pd.DataFrame(rows))
    assert [list(t["method"]) for t in tables] == [["samft", "calsam"], ["samft", "samft_focal", "calsam"]]
    assert len(ablation_tables(pd.DataFrame(rows[:2]))) == 1
    # the FIP/CMP ablation shows samft and calsam already: Table 3's family adds nothing without focal/Dice++
    rows = [{"method": m, "role": "target", "DSC": 0.5, "HD95": 1.0, "ECE": 0.1}
            for m in ("samft", "sam_fip", "sam_cmp", "calsam")]
    assert [list(t["method"]) for t in ablation_tables(pd.DataFrame(rows))] == [["samft", "sam_fip", "sam_cmp",
                                                                                   "calsam"]]


def _masks_cases():
    """Random label/prediction pairs, including empty, one-empty and border-touching ones."""
    rng = np.random.default_rng(7)
    shape = (12, 14, 10)
    cases = [(np.zeros(shape, np.uint8), np.zeros(shape, np.uint8))]
    one = np.zeros(shape, np.uint8)
    one[3:6, 4:8, 2:5] = 2
    cases += [(one, np.zeros(shape, np.uint8)), (np.zeros(shape, np.uint8), one)]
    border = np.zeros(shape, np.uint8)
    border[0:3, :4, 7:] = 1
    border[-2:, -3:, :2] = 3
    cases.append((border, np.roll(border, 1, axis=2)))
    for _ in range(6):
        blobs = (rng.random(shape) < 0.02).astype(np.uint8) * rng.integers(1, 4, shape).astype(np.uint8)
        cases.append((blobs, np.where(rng.random(shape) < 0.5, blobs, 0).astype(np.uint8)))
    return cases


def test_cropped_metrics_equal_the_whole_image():
    """Segmentation metrics and the boundary band computed on the foreground's bounding box equal the whole
    image's on random, empty, one-empty and border-touching masks."""
    from scipy import ndimage

    from calibnet.evaluation.case_evaluation import boundary_band, segmentation_metrics
    from calibnet.runs import LabelTargets

    targets = LabelTargets({"a": [1], "b": [2, 3]}, False)
    spacing = (1.5, 0.8, 2.0)
    for truth, prediction in _masks_cases():
        expected = {f"{m}_{name}": v for name, values in targets.masks.items()
                    for m, v in case_metrics(np.isin(prediction, values), np.isin(truth, values), spacing).items()}
        got = segmentation_metrics(prediction, truth, spacing, targets)
        assert {k: got[k] for k in expected} == expected
        union = (truth > 0) | (prediction > 0)
        whole = ndimage.distance_transform_edt(~union, sampling=spacing) <= 5.0 if union.any() else union
        assert np.array_equal(boundary_band(truth, prediction, targets, spacing), whole)


def test_equal_mass_bins_equal_the_sorted_reference():
    """Equal-mass bins (selected order statistics, no full sort) equal the definition on sorted values, ties
    included: same bins, counts, means and edges."""
    rng = np.random.default_rng(3)
    for trial in range(200):
        n, n_bins = int(rng.integers(1, 400)), int(rng.integers(1, 20))
        confidence = rng.integers(0, 5, n) / 4 if trial % 2 else rng.random(n)
        correct = rng.random(n) < 0.6
        values = np.sort(confidence)
        sizes = np.full(n_bins, n // n_bins) + (np.arange(n_bins) < n % n_bins)
        nominal = np.cumsum(sizes)[:-1]
        at = values[np.minimum(nominal, n - 1)]
        start, end = np.searchsorted(values, at, "left"), np.searchsorted(values, at, "right")
        cuts = np.where(nominal - start <= end - nominal, start, end)
        index = np.searchsorted(cuts, np.searchsorted(values, confidence, "left"), "right")
        edges = np.array([values[c] if c < n else np.nan for c in np.r_[0, cuts]] + [values[-1]])
        bins = calibration_bins(confidence, correct, n_bins, equal_mass=True)
        assert np.array_equal(bins.count, np.bincount(index, minlength=n_bins))
        assert np.array_equal(bins.edges, edges, equal_nan=True)
        with np.errstate(invalid="ignore"):
            assert np.array_equal(bins.accuracy, np.bincount(index, correct, n_bins) / bins.count, equal_nan=True)


def test_worker_processes_give_the_same_results(tmp_path):
    """Cases scored in two worker processes give the metrics, bins and post-hoc samples of one process."""
    import SimpleITK as sitk

    from calibnet.evaluation.case_evaluation import CaseJob, case_pool, evaluate_cases
    from calibnet.runs import LabelTargets

    rng = np.random.default_rng(0)
    jobs = []
    for i, (truth, prediction) in enumerate(_masks_cases()[2:6]):
        paths = {}
        for name, array in (("label", truth), ("seg", prediction), ("image", rng.random(truth.shape) > 0.3)):
            paths[name] = tmp_path / f"{name}{i}.nii.gz"
            sitk.WriteImage(sitk.GetImageFromArray(array.astype(np.uint8)), str(paths[name]))
        probabilities = rng.dirichlet(np.ones(4), truth.shape).transpose(3, 0, 1, 2).astype(np.float32)
        np.savez_compressed(tmp_path / f"p{i}.npz", probabilities=probabilities)
        jobs.append(CaseJob(paths["seg"], tmp_path / f"p{i}.npz", paths["label"], [paths["image"]],
                            LabelTargets({"a": [1], "b": [2], "c": [3]}, False)))
    one = list(evaluate_cases(jobs, np.random.default_rng(1), max_samples=50))
    with case_pool(2) as pool:
        two = list(evaluate_cases(jobs, np.random.default_rng(1), pool, max_samples=50))
    for a, b in zip(one, two):
        assert a.metrics == b.metrics or all(a.metrics[k] == b.metrics[k] or np.isnan(a.metrics[k]) for k in a.metrics)
        assert np.array_equal(a.sample_probabilities, b.sample_probabilities)
        assert np.array_equal(a.sample_labels, b.sample_labels) and a.sample_labels.dtype == b.sample_labels.dtype
        assert all(np.array_equal(a.bins[v].count, b.bins[v].count) for v in a.bins)
