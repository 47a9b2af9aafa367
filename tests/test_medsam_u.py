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
    from calibnet.networks.medsam_u import MedSAMUSegmenter
    from calibnet.networks.sam_backbone import SamConfig, build_sam

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
    from calibnet.inference.model_loading import load_model

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


def _recording_network(monkeypatch, **options):
    """The tiny MedSAM-U network with its decoder replaced by one that records the boxes of every call."""
    from calibnet.networks.medsam_u import MedSAMUSegmenter
    from calibnet.networks.sam_backbone import SamConfig, build_sam

    network = MedSAMUSegmenter(build_sam(SamConfig("tiny")), ugpa=False, seed=42, **options).eval()
    calls = []

    def probability(embedding, slice_shape):
        def predict(box, points, labels):
            calls.append(box)
            return np.full(slice_shape, 0.3)
        return predict

    monkeypatch.setattr(network, "_probability", probability)
    monkeypatch.setattr(network, "embed", lambda slices: torch.zeros(len(slices), 1))
    return network, calls


def test_ugmp_jitter_is_seeded_by_case_slice_and_setting(monkeypatch):
    from calibnet.prompt_quality import parse_setting

    network, calls = _recording_network(monkeypatch)
    sets = [{"boxes": [(4.0, 4.0, 20.0, 20.0)], "points": [], "labels": []}] * 2  # slices 0 and 1 alike

    def jitter(case_id, setting=None):
        calls.clear()
        with network.predicting(case_id=case_id, setting=setting):
            network.decode_uncertainty_guided(torch.zeros(2, 1), sets, (32, 32))
        return calls[:3], calls[3:]  # N = 3 boxes per slice

    case_a, case_b = jitter("case_a"), jitter("case_b")
    assert len(case_a[0]) == 3 and len(case_a[1]) == 3
    assert case_a[0] != case_b[0] and case_a[1] != case_b[1]  # same slice index, another case
    assert jitter("case_a") == case_a  # the same case, slice and setting: the same jitter
    assert case_a[0] != case_a[1]
    with_setting = jitter("case_a", parse_setting("3B0.5"))
    assert with_setting != case_a and jitter("case_a", "3B0.5") == with_setting


def test_ugmp_jitter_of_an_unnamed_case_follows_its_input(monkeypatch):
    """Outside network.predicting(case_id=...) the key comes from the case's images: two cases differ, one case
    repeats."""
    network, calls = _recording_network(monkeypatch)
    box = torch.zeros(1, 1, 24, 24)
    box[0, 0, 4:17, 6:19] = 1

    def jitter(image):
        calls.clear()
        x = torch.cat([image, torch.zeros(2, 1, 24, 24), box])[None]  # 1 image channel + 3 prompt channels
        network(x)
        return list(calls)

    generator = torch.Generator().manual_seed(0)
    first, second = torch.rand(1, 1, 24, 24, generator=generator), torch.rand(1, 1, 24, 24, generator=generator)
    assert len(jitter(first)) == 3
    assert jitter(first) != jitter(second)
    assert jitter(first) == jitter(first.clone())
