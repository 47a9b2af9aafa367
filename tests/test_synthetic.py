import json

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from scipy import stats

from calibnet.dataset_conversion import scanner_profiles
from calibnet.dataset_conversion.mni_anatomy import benchmark_grid, load_mni_tissue_template
from calibnet.dataset_conversion.synthetic import SyntheticConfig, case_specs, generate_case
from calibnet.errors import CalibnetError


def _case(seed, index=1, shape=(24, 24, 24), mode="lesion"):
    config = SyntheticConfig(seed=seed, shape=shape, n_centers=3, cases_per_center=2, label_mode=mode)
    spec = case_specs(config)[index]
    centers = scanner_profiles.make_center_profiles(config.n_centers, config.seed)
    return generate_case(config, spec, centers[spec.center_index], benchmark_grid(shape, load_mni_tissue_template()))


def test_cases_are_deterministic_per_seed_and_differ_across_seeds():
    images_a, label_a = _case(seed=5)
    images_b, label_b = _case(seed=5)
    images_c, label_c = _case(seed=6)
    for a, b in zip(images_a, images_b):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(label_a, label_b)
    assert not np.array_equal(images_a[0], images_c[0])
    assert not np.array_equal(label_a, label_c)


def test_every_case_has_its_own_anatomy_and_lesions():
    (t1_first, _), label_first = _case(seed=5, index=0)
    (t1_second, _), label_second = _case(seed=5, index=1)
    assert not np.array_equal(t1_first != 0, t1_second != 0)  # brain masks differ (deformation)
    assert label_first.any() and label_second.any()
    assert not np.array_equal(label_first, label_second)


def test_brats_mode_nests_enhancing_in_core_in_whole_tumor():
    _, label = _case(seed=3, shape=(40, 40, 40), mode="brats")
    assert set(np.unique(label)) == {0, 1, 2, 3}
    whole, core, enhancing = label > 0, np.isin(label, (2, 3)), label == 3
    assert whole.sum() > core.sum() > enhancing.sum() > 0


def test_images_are_skull_stripped_and_finite():
    images, label = _case(seed=5)
    brain = images[0] != 0
    assert 0.1 < brain.mean() < 0.6
    assert np.array_equal(brain, images[1] != 0)
    assert not label[~brain].any()
    assert all(np.isfinite(im).all() for im in images)


def test_bad_configuration_is_a_clear_error():
    with pytest.raises(CalibnetError, match="unknown channel PD"):
        SyntheticConfig(channels=("T1", "PD")).validate()
    with pytest.raises(CalibnetError, match="at least 16 voxels"):
        SyntheticConfig(shape=(8, 8, 8)).validate()


@pytest.mark.slow
def test_written_dataset_matches_domains_csv(tiny_dataset):
    raw = tiny_dataset.raw
    domains = pd.read_csv(raw / "domains.csv")
    dataset_json = json.loads((raw / "dataset.json").read_text())
    assert dataset_json["channel_names"] == {"0": "T1", "1": "FLAIR"}
    assert dataset_json["labels"] == {"background": 0, "lesion": 1}
    assert dataset_json["numTraining"] == len(domains) == 12
    assert sorted(p.name[:-len("_0000.nii.gz")] for p in (raw / "imagesTr").glob("*_0000.nii.gz")) \
        == sorted(domains.case_id)
    assert sorted(p.name[:-len(".nii.gz")] for p in (raw / "labelsTr").glob("*.nii.gz")) == sorted(domains.case_id)
    assert domains.groupby("center").vendor.first().to_dict() == {
        "C1": "Siemens", "C2": "GE", "C3": "Philips", "C4": "Siemens"}
    assert (raw / "preview.png").stat().st_size > 10_000
    readme = (raw / "README.md").read_text()
    assert "| C3       | Philips" in readme and "BiasField" in readme
    assert "wrote 12 cases" in tiny_dataset.convert_output and "data roots:" in tiny_dataset.convert_output


@pytest.mark.slow
def test_vendor_intensity_statistics_differ_inside_the_brain(tiny_dataset):
    raw = tiny_dataset.raw
    domains = pd.read_csv(raw / "domains.csv")
    rows = []
    for case in domains.itertuples():
        t1 = sitk.GetArrayFromImage(sitk.ReadImage(str(raw / "imagesTr" / f"{case.case_id}_0000.nii.gz")))
        brain = t1[t1 != 0]
        inside = t1 != 0  # SimpleITK order (z, y, x)
        step_z = np.abs(np.diff(t1, axis=0))[inside[1:] & inside[:-1]].mean()
        step_x = np.abs(np.diff(t1, axis=2))[inside[..., 1:] & inside[..., :-1]].mean()
        rows.append({"vendor": case.vendor, "mean": brain.mean(), "z_vs_x_sharpness": np.log(step_z / step_x)})
    table = pd.DataFrame(rows)
    # stored intensity ranges differ: every vendor pair's median brain intensity differs by more than 1.5x,
    # and vendor explains the spread of the case means (Kruskal-Wallis)
    medians = table.groupby("vendor")["mean"].median()
    for a in medians.index:
        for b in medians.index:
            if a < b:
                assert max(medians[a], medians[b]) / min(medians[a], medians[b]) > 1.5, (a, b)
    assert stats.kruskal(*[g["mean"].values for _, g in table.groupby("vendor")]).pvalue < 0.05
    # a scale-free statistic that nnU-Net's z-scoring does not remove: thick axial slices (GE) blur along z,
    # thick sagittal slices (Philips) along x, Siemens is isotropic
    sharpness = table.groupby("vendor")["z_vs_x_sharpness"].median()
    assert sharpness["GE"] < sharpness["Siemens"] < sharpness["Philips"]
    assert stats.kruskal(*[g["z_vs_x_sharpness"].values for _, g in table.groupby("vendor")]).pvalue < 0.05


def test_convert_refuses_an_existing_dataset_and_a_failed_run_leaves_nothing(tmp_path, monkeypatch):
    import os

    from calibnet.cli import convert
    from calibnet.dataset_conversion import synthetic
    from conftest import run_cli

    os.environ["CALIBNET_DATA"] = str(tmp_path)
    args = ["synthetic", "-d", 520, "--shape", 16, "--centers", 2, "--cases-per-center", 1, "-np", 1, "--no-preview"]
    run_cli(convert.main, args)
    again = run_cli(convert.main, args, expect_ok=False)
    assert again.exit_code == 1 and "already exists; pass --overwrite" in again.output

    calls = []

    def failing_case(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return original(*a, **k)

    original = synthetic.generate_case
    monkeypatch.setattr(synthetic, "generate_case", failing_case)
    with pytest.raises(RuntimeError):
        run_cli(convert.main, ["synthetic", "-d", 521, "--shape", 16, "--centers", 2, "--cases-per-center", 1,
                               "-np", 1, "--no-preview"])
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == ["Dataset520_SynthBrain"]
