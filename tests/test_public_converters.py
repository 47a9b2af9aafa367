"""Each public-dataset converter on a mock tree in the publisher's exact layout: nnU-Net's integrity
check passes, domains.csv is right per case, labels are remapped, the input is untouched, and bad
layouts give one clear message and leave no dataset folder."""
import hashlib
import os

import numpy as np
import pytest
import SimpleITK as sitk
from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

from calibnet.cli import convert
from calibnet.domains import read_domains
from calibnet.planners.splits import build_calib_splits
from conftest import run_cli
import public_mocks as mocks


@pytest.fixture
def workspace(tmp_path):
    os.environ["CALIBNET_DATA"] = str(tmp_path / "data")
    (tmp_path / "downloads").mkdir()
    return tmp_path


def _hash(folder):
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        digest.update(str(path.relative_to(folder)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _convert(workspace, name, input_dir, dataset_id, *extra):
    before = _hash(input_dir)
    result = run_cli(convert.main, [name, "-i", input_dir, "-d", dataset_id, *extra])
    assert _hash(input_dir) == before, "the input folder was modified"
    folders = list((workspace / "data" / "raw").glob(f"Dataset{dataset_id}_*"))
    assert len(folders) == 1
    verify_dataset_integrity(str(folders[0]), 1)
    return folders[0], read_domains(folders[0] / "domains.csv").set_index("case_id"), result.output


def _label(folder, case_id):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "labelsTr" / f"{case_id}.nii.gz")))


def _rejected(workspace, args, *fragments):
    result = run_cli(convert.main, args, expect_ok=False)
    assert result.exit_code == 1 and "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.output, result.output
    raw = workspace / "data" / "raw"
    assert not raw.exists() or not list(raw.iterdir()), "a dataset folder was left behind"


def test_brats_2023_with_fets_centers_groups_timepoints(workspace):
    root = workspace / "downloads" / "ASNR-MICCAI-BraTS2023-GLI-Challenge-TrainingData"
    written = mocks.make_brats(root, 2023, np.random.default_rng(0))
    mocks.write_fets_partitioning(workspace / "downloads" / "partitioning_1.csv")
    # the parent of the training-data folder is accepted too
    folder, domains, output = _convert(workspace, "brats", root.parent, 701, "--year", 2023,
                                       "--centers", workspace / "downloads" / "partitioning_1.csv")
    assert sorted(domains.index) == ["BraTS-GLI-00001-000", "BraTS-GLI-00002-000", "BraTS-GLI-00002-001",
                                     "BraTS-GLI-00003-000", "BraTS-GLI-00004-000"]
    assert domains.loc["BraTS-GLI-00002-001", ["center", "vendor", "patient", "timepoint"]].tolist() == \
        ["inst01", "unknown", "00002", "001"]
    assert domains.loc["BraTS-GLI-00004-000", "center"] == "inst02"
    assert "1 case(s) are not in partitioning_1.csv and were left out (first: BraTS-GLI-00005-000)" in output
    assert "scanner split needs vendor information" in output
    source, target = written["BraTS-GLI-00001-000"], _label(folder, "BraTS-GLI-00001-000")
    assert (target[source == 1] == 2).all() and (target[source == 2] == 1).all() and (target[source == 3] == 3).all()
    for fold in build_calib_splits(read_domains(folder / "domains.csv"))["loco"]["folds"]:
        sides = [{c[:15] for c in fold[part]} for part in ("train", "val", "test")]  # BraTS-GLI-XXXXX
        assert not (sides[0] & sides[1]) and not (sides[0] & sides[2]) and not (sides[1] & sides[2])


def test_brats_2021_remaps_label_4_and_2024_keeps_the_resection_cavity(workspace):
    root21 = workspace / "downloads" / "BraTS2021_Training_Data"
    written = mocks.make_brats(root21, 2021, np.random.default_rng(1))
    folder, domains, _ = _convert(workspace, "brats", root21, 702, "--year", 2021)
    source, target = written["BraTS2021_00003"], _label(folder, "BraTS2021_00003")
    assert (target[source == 4] == 3).all() and (target[source == 1] == 2).all()
    assert domains.loc["BraTS2021_00003", "patient"] == "00003" and "timepoint" not in domains.columns
    root24 = workspace / "downloads" / "BraTS2024"
    mocks.make_brats(root24, 2024, np.random.default_rng(2))
    folder24, _, _ = _convert(workspace, "brats", root24, 703, "--year", 2024)
    import json
    labels = json.loads((folder24 / "dataset.json").read_text())["labels"]
    assert labels["resection_cavity"] == [4] and labels["tumor_core"] == [2, 3]


def test_brats_missing_modality_and_wrong_year(workspace):
    root = workspace / "downloads" / "BraTS2023"
    mocks.make_brats(root, 2023, np.random.default_rng(0))
    _rejected(workspace, ["brats", "-i", root, "-d", 704, "--year", 2021], "does not look like a BraTS 2021")
    missing = root / "BraTS-GLI-00003-000" / "BraTS-GLI-00003-000-t2f.nii.gz"
    missing.unlink()
    _rejected(workspace, ["brats", "-i", root, "-d", 704], f"{missing} is missing")


def test_atlas2_centers_from_cohorts_and_metadata(workspace):
    root = mocks.make_atlas2(workspace / "downloads", np.random.default_rng(0))
    folder, domains, output = _convert(workspace, "atlas2", root, 705)
    assert sorted(domains.index) == ["sub-r001s001", "sub-r001s002", "sub-r002s001", "sub-r002s003"]
    assert domains.loc["sub-r001s002", ["center", "vendor", "scanner", "field_strength"]].tolist() == \
        ["R001", "Siemens", "Trio", "3"]
    assert domains.loc["sub-r002s001", "vendor"] == "GE"
    assert domains.loc["sub-r002s003", "vendor"] == "unknown"  # not in the metadata file
    assert "Testing/ has no lesion masks and was skipped" in output


def test_atlas2_mismatched_geometry_is_named(workspace):
    root = mocks.make_atlas2(workspace / "downloads", np.random.default_rng(0))
    mask = next(root.rglob("sub-r002s001_*lesion_mask.nii.gz"))
    mocks.write_volume(mask, mocks.label_with(np.random.default_rng(0), (1,)), spacing=(1.0, 1.0, 2.0))
    _rejected(workspace, ["atlas2", "-i", root, "-d", 706], "sub-r002s001_ses-1_space-MNI152NLin2009aSym_T1w.nii.gz",
              "does not share the geometry", "spacing")


def test_mnms_extracts_annotated_ed_es_frames(workspace):
    root = mocks.make_mnms(workspace / "downloads", np.random.default_rng(0))
    folder, domains, output = _convert(workspace, "mnms", root.parent, 707)
    assert len(domains) == 6
    assert domains.loc["B1C2D3_ES", ["center", "vendor", "vendor_code", "patient", "phase"]].tolist() == \
        ["Centre2", "Philips", "B", "B1C2D3", "ES"]
    assert "B1C2D3: CSV says ED=1, ES=3, ground truth is in frames [0, 3]; used ED=0, ES=3" in output
    ed, es = _label(folder, "E4F5G6_ED"), _label(folder, "E4F5G6_ES")
    assert ed.shape == mocks.SHAPE and (ed == 1).sum() > (es == 1).sum() > 0
    image = sitk.ReadImage(str(folder / "imagesTr" / "E4F5G6_ED_0000.nii.gz"))
    assert image.GetDimension() == 3
    source = sitk.GetArrayFromImage(sitk.ReadImage(str(root / "Training/Labeled/E4F5G6/E4F5G6_sa.nii.gz")))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), source[4])  # ED is frame 4


def test_mnms2_normalises_vendors(workspace):
    root = mocks.make_mnms2(workspace / "downloads", np.random.default_rng(0))
    folder, domains, output = _convert(workspace, "mnms2", root, 708)
    assert sorted(domains.index) == ["001_ED", "001_ES", "002_ED", "002_ES", "003_ED", "003_ES"]
    assert domains.loc["002_ES", ["center", "vendor", "scanner", "field_strength", "disease", "patient"]].tolist() == \
        ["Achieva", "Philips", "Achieva", "1.5", "DLV", "002"]
    assert set(domains["vendor"]) == {"Siemens", "Philips", "GE"}
    assert "scanner model is used as the center" in output


def test_prostate_sites_capital_s_and_value_2(workspace):
    root = mocks.make_prostate(workspace / "downloads", np.random.default_rng(0))
    folder, domains, output = _convert(workspace, "prostate_ms", root, 709)
    assert sorted(domains.index) == ["BIDMC_Case00", "BIDMC_Case03", "BMC_Case00", "BMC_Case02",
                                     "RUNMC_Case00", "RUNMC_Case01"]
    assert domains.loc["BMC_Case02", ["center", "vendor", "field_strength"]].tolist() == ["BMC", "Philips", "1.5"]
    assert domains.loc["BIDMC_Case03", "vendor"] == "GE"
    assert set(np.unique(_label(folder, "BIDMC_Case03"))) == {0, 1}
    assert "label value 2 was mapped to 1 in 1 case(s)" in output
    assert "site folder HK (HK) is absent" in output


def test_prostate_label_outside_the_expected_set(workspace):
    root = mocks.make_prostate(workspace / "downloads", np.random.default_rng(0))
    bad = root / "ISBI" / "Case01_segmentation.nii.gz"
    mocks.write_volume(bad, mocks.label_with(np.random.default_rng(0), (3,)))
    _rejected(workspace, ["prostate_ms", "-i", root, "-d", 710], f"{bad} has label value(s) [3] outside the expected")


def test_ibsr18_squeezes_4d_volumes(workspace):
    root = mocks.make_ibsr(workspace / "downloads", np.random.default_rng(0))
    folder, domains, output = _convert(workspace, "ibsr18", root, 711)
    assert list(domains.index) == ["IBSR_01", "IBSR_02", "IBSR_03"]
    assert set(domains["center"]) == {"IBSR"} and set(domains["vendor"]) == {"unknown"}
    assert sitk.ReadImage(str(folder / "labelsTr" / "IBSR_02.nii.gz")).GetSize() == (10, 12, 8)
    assert "leave-one-center-out is not possible" in output


def test_wrong_folder_is_a_clear_error(workspace):
    root = mocks.make_mnms2(workspace / "downloads", np.random.default_rng(0))
    _rejected(workspace, ["mnms", "-i", root, "-d", 712], "does not look like the M&Ms-1 OpenDataset folder")
    _rejected(workspace, ["prostate_ms", "-i", root, "-d", 712], "does not look like the multi-site prostate folder")


def test_list_shows_every_converter():
    output = run_cli(convert.main, ["--list"]).output
    for name in ("synthetic", "corrupt", "brats", "atlas2", "mnms", "mnms2", "prostate_ms", "ibsr18"):
        assert f"\n{name}" in "\n" + output
    assert "partitioning_1.csv" in output


def test_brats_generic_centers_and_vendors_csv(workspace):
    root = workspace / "downloads" / "BraTS2023"
    mocks.make_brats(root, 2023, np.random.default_rng(0))
    centers = workspace / "downloads" / "sites.csv"
    centers.write_text("case,center\nBraTS-GLI-00001-000,Penn\nBraTS-GLI-00002-000,Penn\n00003,UCSF\n00004,UCSF\n"
                       "BraTS-GLI-00005-000,TCGA\n")
    vendors = workspace / "downloads" / "vendors.csv"
    vendors.write_text("case,vendor\nBraTS-GLI-00001-000,SIEMENS\n00002,GE MEDICAL SYSTEMS\n")
    _, domains, output = _convert(workspace, "brats", root, 713, "--centers", centers, "--vendors", vendors)
    assert domains["center"].to_dict() == {
        "BraTS-GLI-00001-000": "Penn", "BraTS-GLI-00002-000": "Penn", "BraTS-GLI-00002-001": "Penn",
        "BraTS-GLI-00003-000": "UCSF", "BraTS-GLI-00004-000": "UCSF", "BraTS-GLI-00005-000": "TCGA"}
    assert domains.loc["BraTS-GLI-00002-001", "vendor"] == "GE"  # matched on the patient number
    assert domains.loc["BraTS-GLI-00003-000", "vendor"] == "unknown"
    assert "left out" not in output
