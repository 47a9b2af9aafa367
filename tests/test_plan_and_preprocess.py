import json

import pytest

from calibnet.cli import convert, plan_and_preprocess
from conftest import run_cli

pytestmark = pytest.mark.slow


def test_plans_have_clipped_divisible_3d_patch_and_a_2d_configuration(tiny_dataset):
    plans = json.loads((tiny_dataset.preprocessed / "CalibPlans.json").read_text())
    assert plans["plans_name"] == "CalibPlans" and plans["experiment_planner_used"] == "CalibPlanner"
    fullres = plans["configurations"]["3d_fullres"]
    median = fullres["median_image_size_in_voxels"]
    strides = fullres["architecture"]["arch_kwargs"]["strides"]
    for axis, edge in enumerate(fullres["patch_size"]):
        assert edge <= median[axis]
        divisor = 1
        for stride in strides:
            divisor *= stride[axis]
        assert edge % divisor == 0
    assert fullres["batch_size"] >= 2
    assert "2d" in plans["configurations"]
    for configuration in ("CalibPlans_2d", "CalibPlans_3d_fullres"):
        assert len(list((tiny_dataset.preprocessed / configuration).glob("*.pkl"))) == 12


def test_splits_files_are_written_and_consistent(tiny_dataset):
    splits = json.loads((tiny_dataset.preprocessed / "calib_splits.json").read_text())
    nnunet = json.loads((tiny_dataset.preprocessed / "splits_final.json").read_text())
    assert [f["held_out"]["center"] for f in splits["loco"]["folds"]] == ["C1", "C2", "C3", "C4"]
    assert [f["source"]["vendor"] for f in splits["scanner"]["folds"]] == ["Siemens", "GE", "Philips"]
    assert nnunet == [{"train": f["train"], "val": f["val"]} for f in splits["loco"]["folds"]]
    out = tiny_dataset.plan_output
    assert "data roots:" in out and "loco    fold 0 holds out center C1" in out
    assert "scanner fold 0 trains on vendor Siemens: 4 train, 2 val, 6 test" in out


def test_128_cube_patch_on_a_dataset_large_enough(tmp_path):
    import os
    os.environ["CALIBNET_DATA"] = str(tmp_path)
    run_cli(convert.main, ["synthetic", "-d", 513, "--shape", 176, "--centers", 2, "--cases-per-center", 2,
                           "--no-preview"])
    out = run_cli(plan_and_preprocess.main, ["-d", 513, "--plan-only", "-np", 1]).output
    plans = json.loads((tmp_path / "preprocessed" / "Dataset513_SynthBrain" / "CalibPlans.json").read_text())
    fullres = plans["configurations"]["3d_fullres"]
    assert min(fullres["median_image_size_in_voxels"]) >= 128
    assert fullres["patch_size"] == [128, 128, 128]
    assert fullres["architecture"]["arch_kwargs"]["n_stages"] == 6
    assert "3d_fullres  patch 128x128x128" in out


def test_an_existing_splits_final_json_of_the_user_is_left_byte_identical(raw_copy):
    preprocessed = raw_copy.parent.parent / "preprocessed" / raw_copy.name
    preprocessed.mkdir(parents=True)
    users = preprocessed / "splits_final.json"
    users.write_bytes(b'[{"train": ["C1_000", "C2_000"], "val": ["C3_000"]}]\n')
    before = users.read_bytes()
    result = run_cli(plan_and_preprocess.main, ["-d", 512, "--plan-only", "-np", 1])
    assert users.read_bytes() == before
    assert f"{users} is not calibnet's: left as it is" in result.output
    assert (preprocessed / "calib_splits.json").exists()


def test_calibnet_replaces_its_own_splits_final_json_when_planning_again(raw_copy):
    preprocessed = raw_copy.parent.parent / "preprocessed" / raw_copy.name
    run_cli(plan_and_preprocess.main, ["-d", 512, "--plan-only", "-np", 1])
    first = json.loads((preprocessed / "splits_final.json").read_text())
    result = run_cli(plan_and_preprocess.main, ["-d", 512, "--plan-only", "-np", 1, "--split-seed", 3])
    splits = json.loads((preprocessed / "calib_splits.json").read_text())
    nnunet = json.loads((preprocessed / "splits_final.json").read_text())
    assert nnunet == [{"train": f["train"], "val": f["val"]} for f in splits["loco"]["folds"]] != first
    assert "not calibnet's" not in result.output
