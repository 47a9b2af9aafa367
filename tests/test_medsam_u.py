"""medsam_u (MedSAM-U) with the tiny SAM on the tiny dataset: MPA trains only the adapters and the prompt
encoder; prediction runs UGMP + UGPA and writes the uncertainty map and UGPA's decisions."""
import json

import numpy as np
import pytest
import torch

from calibnet.cli import train as train_cli
from conftest import run_cli

pytestmark = pytest.mark.slow
SHORT = ["--epochs", 1, "--iters-per-epoch", 2, "--device", "cpu", "--sam-model", "tiny", "--num-workers", 0]


@pytest.fixture(scope="module")
def medsam_u_run(tiny_dataset):
    tiny_dataset.activate()
    output = run_cli(train_cli.main, [511, "3d_fullres", "medsam_u", 2, *SHORT]).output
    folder = (tiny_dataset.data_dir / "results" / "Dataset511_Tiny" / "nnUNetTrainerMedSAMU__CalibPlans__3d_fullres"
              / "loco_fold2_seed42")
    return output, folder


def test_mpa_trains_the_adapters_and_the_prompt_encoder_and_nothing_else(medsam_u_run):
    from calibnet.trainers.nnUNetTrainerMedSAMU import MedSAMUSegmenter
    from calibnet.trainers.sam_backbone import SamConfig, build_sam

    _, folder = medsam_u_run
    initial = MedSAMUSegmenter(build_sam(SamConfig("tiny"))).state_dict()  # what the trainer started from
    trained = torch.load(folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)["network_weights"]
    assert set(trained) == set(initial)
    changed = {k for k in initial if not torch.equal(initial[k], trained[k])}
    assert any(".adapter.up." in k for k in changed), "the zero-initialised up-projections must move"
    assert any(k.startswith("sam.prompt_encoder.") for k in changed)
    assert all(".adapter." in k or k.startswith("sam.prompt_encoder.") for k in changed), \
        sorted(k for k in changed if ".adapter." not in k and not k.startswith("sam.prompt_encoder."))
    record = json.loads((folder / "calibnet_run.json").read_text())
    assert record["network_options"] == {"seed": 42} and record["note"] == "tiny SAM, not pretrained"


def test_prediction_writes_uncertainty_maps_and_ugpa_decisions(tiny_dataset, medsam_u_run):
    _, folder = medsam_u_run
    predictions = folder / "predictions" / "test"
    confidence = json.loads((predictions / "confidence.json").read_text())
    assert len(confidence) == 3
    for case_id, scores in confidence.items():
        probabilities = np.load(predictions / f"{case_id}.npz")["probabilities"].astype(np.float64)
        uncertainty = np.load(predictions / f"{case_id}_uncertainty.npz")["uncertainty"].astype(np.float64)
        p = np.clip(probabilities[1], 1e-12, 1 - 1e-12)
        np.testing.assert_allclose(uncertainty, -(p * np.log2(p) + (1 - p) * np.log2(1 - p)), atol=2e-3)
        assert 0 <= scores["ugmp_mean_uncertainty"] <= 1 and 0 <= scores["ugpa_accepted_fraction"] <= 1
        decisions = scores["ugpa_accepted"]
        assert any(d is not None for d in decisions) and any(d is None for d in decisions)
        assert set(decisions) <= {True, False, None}


def test_prompt_settings_feed_ugmp_directly(tiny_dataset, medsam_u_run):
    _, folder = medsam_u_run
    tiny_dataset.activate()
    run_cli(train_cli.main, [511, "3d_fullres", "medsam_u", 2, "--predict-only", "--device", "cpu",
                             "--prompts", "3P+3B0.75"])
    confidence = json.loads((folder / "predictions" / "prompts_3P+3B0.75" / "test" / "confidence.json").read_text())
    assert all("ugpa_accepted" in scores for scores in confidence.values())


@pytest.mark.parametrize("args, message", [
    (["medsam_u", 1, "--adapter-blocks", "9"], "--adapter-blocks '9': give 'all' or indices"),
    (["samft", 1, "--ugmp-boxes", "5"], "--ugmp-boxes apply to medsam_u, not samft"),
])
def test_bad_medsam_u_options_give_one_clear_message(tiny_dataset, args, message):
    tiny_dataset.activate()
    result = run_cli(train_cli.main, [511, "3d_fullres", *args, *SHORT], expect_ok=False)
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output


def test_options_are_recorded_and_rebuild_the_same_network(tiny_dataset):
    from calibnet.inference.predict import load_model

    tiny_dataset.activate()
    run_cli(train_cli.main, [511, "3d_fullres", "medsam_u", 3, *SHORT, "--adapter-blocks", "0", "--adapter-ratio",
                             0.5, "--ugmp-boxes", 2, "--no-ugpa", "--disable-tta"])
    folder = (tiny_dataset.data_dir / "results" / "Dataset511_Tiny" / "nnUNetTrainerMedSAMU__CalibPlans__3d_fullres"
              / "loco_fold3_seed42")
    record = json.loads((folder / "calibnet_run.json").read_text())
    assert record["network_options"] == {"adapter_blocks": "0", "adapter_ratio": 0.5, "n_boxes": 2, "ugpa": False,
                                         "seed": 42}
    network = load_model(folder, "cpu").predictor.network
    assert len(network.adapters) == 1 and network.options["n_boxes"] == 2 and not network.options["ugpa"]
    confidence = json.loads((folder / "predictions" / "test" / "confidence.json").read_text())
    assert all(not any(d for d in scores["ugpa_accepted"] if d is not None) for scores in confidence.values())


def test_table_iii_rows_with_and_without_ugpa(tiny_dataset, medsam_u_run):
    """Predicted with 3B0.5 with and without UGPA, the prompt-quality table has both rows."""
    import pandas as pd

    from calibnet.cli import evaluate as evaluate_cli

    _, folder = medsam_u_run
    tiny_dataset.activate()
    common = [511, "3d_fullres", "medsam_u", 2, "--predict-only", "--device", "cpu", "--prompts", "3B0.5"]
    run_cli(train_cli.main, common)
    run_cli(train_cli.main, [*common, "--no-ugpa"])
    without = folder / "predictions" / "prompts_3B0.5_noUGPA" / "test"
    assert json.loads((without / "prompts.json").read_text()) == {"setting": "3B0.5", "seed": 42, "ugpa": False}
    for scores in json.loads((without / "confidence.json").read_text()).values():
        assert not any(scores["ugpa_accepted"])
    result = run_cli(train_cli.main, [511, "3d_fullres", "medsam_u", 2, "--predict-only", "--no-ugpa"],
                     expect_ok=False)
    assert result.exit_code == 2 and "needs --prompts SETTING" in result.output
    report = run_cli(evaluate_cli.main, ["--split", "loco", "--methods", "medsam_u", "--folds", 2]).output
    assert "## Prompt quality (target cases)" in report
    per_case = pd.read_csv(tiny_dataset.data_dir / "results" / "Dataset511_Tiny" / "evaluation" / "loco" / "per_case.csv")
    labels = set(per_case["method"])
    assert {"medsam_u", "medsam_u [3B0.5]", "medsam_u w/o UGPA [3B0.5]"} <= labels
    assert set(per_case.loc[per_case["method"] == "medsam_u", "prompts"]) == {"B100"}
