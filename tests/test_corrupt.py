"""calib_convert corrupt: ATLAS-C style copies, labels unchanged, condition recorded, source untouched."""
import hashlib
import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from calibnet.cli import convert, plan_and_preprocess
from conftest import run_cli

pytestmark = pytest.mark.slow


def _tree_hash(folder):
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def _array(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


@pytest.fixture
def source(tiny_dataset, tmp_path):
    target = tmp_path / "data" / "raw" / "Dataset512_Tiny"
    shutil.copytree(tiny_dataset.raw, target)
    os.environ["CALIBNET_DATA"] = str(tmp_path / "data")
    return target


def test_corrupted_copies_keep_labels_and_record_the_condition(source):
    before = _tree_hash(source)
    out = run_cli(convert.main, ["corrupt", "-d", 512, "--to", 532, "--artifacts", "motion,noise",
                                 "--severity", "3", "--seed", 1]).output
    assert _tree_hash(source) == before
    copy = source.parent / "Dataset532_TinyC"
    domains = pd.read_csv(copy / "domains.csv")
    assert len(domains) == 36 and "wrote 36 cases" in out
    assert domains.groupby("condition").size().to_dict() == {"clean": 12, "motion": 12, "noise": 12}
    row = domains.set_index("case_id").loc["C2_001_noise3"]
    assert (row.center, row.vendor, row.source_case, row.patient, row.severity) == ("C2", "GE", "C2_001", "C2_001", 3)
    assert json.loads((copy / "dataset.json").read_text())["numTraining"] == 36
    np.testing.assert_array_equal(_array(copy / "labelsTr" / "C2_001_motion3.nii.gz"),
                                  _array(source / "labelsTr" / "C2_001.nii.gz"))
    original = _array(source / "imagesTr" / "C2_001_0000.nii.gz")
    np.testing.assert_array_equal(_array(copy / "imagesTr" / "C2_001_clean_0000.nii.gz"), original)
    for artifact in ("motion3", "noise3"):
        assert not np.allclose(_array(copy / "imagesTr" / f"C2_001_{artifact}_0000.nii.gz"), original)


def test_corruption_is_seeded(source):
    # the same (seed, case, artifact, severity) gives the same copy, whatever else is requested alongside
    for target, seed, artifacts in ((533, 1, "ghosting"), (534, 1, "motion,ghosting"), (535, 2, "ghosting")):
        run_cli(convert.main, ["corrupt", "-d", 512, "--to", target, "--artifacts", artifacts, "--severity", "4",
                               "--seed", seed, "--no-clean", "--name", f"T{target}"])
    image = "imagesTr/C1_000_ghosting4_0000.nii.gz"
    first, same, other = (_array(source.parent / f"Dataset{t}_T{t}" / image) for t in (533, 534, 535))
    np.testing.assert_array_equal(first, same)
    assert not np.array_equal(first, other)


def test_unknown_artifact_is_a_clear_error_and_writes_nothing(source):
    result = run_cli(convert.main, ["corrupt", "-d", 512, "--to", 536, "--artifacts", "motion,blur"],
                     expect_ok=False)
    assert result.exit_code == 1 and "unknown artifact blur; choose from motion" in result.output
    result = run_cli(convert.main, ["corrupt", "-d", 512, "--to", 536, "--severity", "7"], expect_ok=False)
    assert result.exit_code == 1 and "severity 7 is not one of 1..5" in result.output
    assert sorted(p.name for p in source.parent.iterdir()) == ["Dataset512_Tiny"]


def test_copies_of_one_case_never_straddle_a_split(source):
    run_cli(convert.main, ["corrupt", "-d", 512, "--to", 537, "--artifacts", "bias,spike", "--severity", "2"])
    run_cli(plan_and_preprocess.main, ["-d", 537, "--plan-only", "-np", 1])
    splits = json.loads((source.parent.parent / "preprocessed" / "Dataset537_TinyC" / "calib_splits.json").read_text())
    for family in ("loco", "scanner"):
        for fold in splits[family]["folds"]:
            sides = [{c.rsplit("_", 1)[0] for c in fold[part]} for part in ("train", "val", "test")]
            assert not (sides[0] & sides[1]) and not (sides[0] & sides[2]) and not (sides[1] & sides[2])
