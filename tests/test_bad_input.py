"""Each kind of bad raw dataset gives one clear message naming the file or case, and
calib_plan_and_preprocess writes nothing for it."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from calibnet.cli import plan_and_preprocess
from conftest import run_cli

pytestmark = pytest.mark.slow


def _plan(expect_ok=False, *extra):
    return run_cli(plan_and_preprocess.main, ["-d", 512, "-np", 1, *extra], expect_ok=expect_ok)


def _preprocessed(raw_copy: Path) -> Path:
    return Path(os.environ["CALIBNET_DATA"]) / "preprocessed" / raw_copy.name


def _set_column_everywhere(raw_copy: Path, column: int, value: str) -> None:
    lines = (raw_copy / "domains.csv").read_text().splitlines()
    rows = [line.split(",") for line in lines[1:]]
    for row in rows:
        row[column] = value
    (raw_copy / "domains.csv").write_text("\n".join([lines[0]] + [",".join(r) for r in rows]) + "\n")


def _assert_rejected(raw_copy, *fragments):
    result = _plan()
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.output, result.output
    assert not _preprocessed(raw_copy).exists()


def test_missing_domains_csv(raw_copy):
    (raw_copy / "domains.csv").unlink()
    _assert_rejected(raw_copy, f"{raw_copy / 'domains.csv'} is missing")


def test_case_without_a_domains_row(raw_copy):
    lines = (raw_copy / "domains.csv").read_text().splitlines()
    (raw_copy / "domains.csv").write_text("\n".join(line for line in lines if not line.startswith("C2_001")) + "\n")
    _assert_rejected(raw_copy, "case C2_001 has images but no row")


def test_empty_vendor(raw_copy):
    text = (raw_copy / "domains.csv").read_text().replace("C3_002,C3,Philips", "C3_002,C3,")
    (raw_copy / "domains.csv").write_text(text)
    _assert_rejected(raw_copy, "case C3_002 has an empty 'vendor'")


def test_malformed_dataset_json(raw_copy):
    (raw_copy / "dataset.json").write_text('{"channel_names": {"0": "T1"},')
    _assert_rejected(raw_copy, f"{raw_copy / 'dataset.json'} is not valid JSON")


def test_missing_channel_file(raw_copy):
    (raw_copy / "imagesTr" / "C1_002_0001.nii.gz").unlink()
    _assert_rejected(raw_copy, "case C1_002", "C1_002_0001.nii.gz is missing")


def test_mismatched_geometry(raw_copy):
    path = raw_copy / "imagesTr" / "C4_000_0001.nii.gz"
    image = sitk.ReadImage(str(path))
    image.SetSpacing([s * 1.5 for s in image.GetSpacing()])
    sitk.WriteImage(image, str(path))
    _assert_rejected(raw_copy, "case C4_000: image C4_000_0001.nii.gz has spacing")


def test_nan_voxels(raw_copy):
    path = raw_copy / "imagesTr" / "C2_002_0000.nii.gz"
    image = sitk.ReadImage(str(path))
    array = sitk.GetArrayFromImage(image)
    array[5, 5, 5] = np.nan
    damaged = sitk.GetImageFromArray(array)
    damaged.CopyInformation(image)
    sitk.WriteImage(damaged, str(path))
    _assert_rejected(raw_copy, "case C2_002: image C2_002_0000.nii.gz contains 1 NaN voxel(s)")


def test_single_center_cannot_be_split_by_center(raw_copy):
    _set_column_everywhere(raw_copy, 1, "C1")
    _assert_rejected(raw_copy, "leave-one-center-out needs at least 2 centers")


def test_label_outside_dataset_json_is_caught_by_nnunet_check(raw_copy):
    path = raw_copy / "labelsTr" / "C1_000.nii.gz"
    image = sitk.ReadImage(str(path))
    array = sitk.GetArrayFromImage(image)
    array[array == 1] = 4
    damaged = sitk.GetImageFromArray(array)
    damaged.CopyInformation(image)
    sitk.WriteImage(damaged, str(path))
    result = _plan()
    assert result.exit_code == 1 and "nnU-Net's integrity check rejected" in result.output
    assert not _preprocessed(raw_copy).exists()


def test_unknown_dataset_id_lists_available_ones(raw_copy):
    result = run_cli(plan_and_preprocess.main, ["-d", 599], expect_ok=False)
    assert result.exit_code == 1
    assert "no dataset with id 599" in result.output and "Dataset512_Tiny" in result.output


def test_single_vendor_skips_scanner_split_with_a_warning(raw_copy):
    _set_column_everywhere(raw_copy, 2, "GE")
    result = _plan(True, "--plan-only")
    assert "warning: scanner split skipped: the scanner split needs at least 2 known vendors, found GE" \
        in result.output
    splits = json.loads((_preprocessed(raw_copy) / "calib_splits.json").read_text())
    assert splits["scanner"]["folds"] == [] and len(splits["loco"]["folds"]) == 4
