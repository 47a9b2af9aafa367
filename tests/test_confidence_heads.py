"""confidence_head end to end on the tiny dataset: a frozen nnunet_dropout base (scanner fold 0), heads trained
with and without adversarial perturbations, their scores in confidence.json, calib_predict --confidence and
calib_evaluate's failure-detection table; the same path on the 2d configuration (a 2-D head on slices); plus
the trainer's adversarial step and the feature capture."""
import hashlib
import json
import shutil

import pytest
import torch

from calibnet.cli import evaluate as evaluate_cli
from calibnet.cli import predict as predict_cli
from calibnet.cli import train as train_cli
from conftest import run_cli

pytestmark = pytest.mark.slow
SHORT = ["--epochs", 2, "--iters-per-epoch", 3, "--device", "cpu", "--num-workers", 0]
BASE = ["--split", "scanner", "--base", "nnunet_dropout"]


def _base_folder(tiny_dataset):
    return (tiny_dataset.data_dir / "results" / "Dataset511_Tiny" / "nnUNetTrainerDropout__CalibPlans__3d_fullres"
            / "scanner_fold0_seed42")


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def heads(tiny_dataset):
    """The base (with 2 MC-dropout samples), then a plain and an adversarial head (1 warm-up batch)."""
    tiny_dataset.activate()
    run_cli(train_cli.main, [511, "3d_fullres", "nnunet_dropout", 0, "--split", "scanner", *SHORT, "--disable-tta",
                             "--mc-samples", 2])
    base = _base_folder(tiny_dataset)
    base_hash = _sha(base / "checkpoint_final.pth")
    plain = run_cli(train_cli.main, [511, "3d_fullres", "confidence_head", 0, *BASE, "--no-adversarial", *SHORT]).output
    adversarial = run_cli(train_cli.main, [511, "3d_fullres", "confidence_head", 0, *BASE, "--warmup-batches", 1,
                                           *SHORT]).output
    return {"base": base, "base_hash": base_hash, "plain": plain, "adversarial": adversarial}


def test_heads_train_with_and_without_the_adversarial_scheme(heads):
    base = heads["base"]
    assert _sha(base / "checkpoint_final.pth") == heads["base_hash"], "training a head changed the base checkpoint"
    for folder_name, adversarial in (("confidence_head", True), ("confidence_head_plain", False)):
        folder = base / folder_name
        assert f"trained confidence head: {folder}" in heads["adversarial" if adversarial else "plain"]
        history = json.loads((folder / "head_training.json").read_text())
        assert history["adversarial"] is adversarial and len(history["epochs"]) == 2
        assert (folder / "head_training.png").stat().st_size > 0
        checkpoint = torch.load(folder / "checkpoint_final.pth", weights_only=True)
        assert set(checkpoint) >= {"head_weights", "head_config", "outputs"}
        assert checkpoint["outputs"] == ["dice:lesion", "nsd:lesion"]
        assert not any("network_weights" in k for k in checkpoint), "a head checkpoint must not copy the base"
        batches = [e["adversarial_batches"] for e in history["epochs"]]
        if adversarial:  # batch 0 is the warm-up; every later batch carries the previous batch's perturbed copies
            assert batches == [2, 3]
            assert all(e["predicted_drop"] is not None for e in history["epochs"])
            assert history["epochs"][-1]["alpha"] != pytest.approx(0.8, abs=1e-9)
        else:
            assert batches == [0, 0] and all(e["alpha"] == 0.8 for e in history["epochs"])


def test_head_scores_land_in_confidence_json_beside_the_other_scores(heads):
    for role in ("val", "test"):
        confidence = json.loads((heads["base"] / "predictions" / role / "confidence.json").read_text())
        for scores in confidence.values():
            for prefix in ("adversarial_head", "plain_head"):
                for kind in ("dice", "nsd"):
                    assert 0 < scores[f"{prefix}_predicted_{kind}"] < 1
            assert "mc_dice_agreement_n2" in scores and "mc_nsd_agreement_n2" in scores, \
                "adding head scores must keep the base's MC-dropout scores"


def test_failure_detection_table_has_head_rows_next_to_the_baselines(tiny_dataset, heads):
    tiny_dataset.activate()
    run_cli(evaluate_cli.main, ["--split", "scanner", "--methods", "nnunet_dropout"])
    table = (tiny_dataset.data_dir / "results" / "Dataset511_Tiny" / "evaluation" / "scanner"
             / "failure_detection.csv")
    import pandas as pd
    rows = pd.read_csv(table)
    pooled = rows[rows["domain"] == "pooled"].set_index("score")
    for score in ("adversarial_head_predicted_dice", "plain_head_predicted_dice", "mean_max_probability_foreground",
                  "mc_dice_agreement_n2"):
        assert score in pooled.index
    assert pooled.loc["adversarial_head_predicted_nsd", "quality"] == "NSD"
    assert pooled.loc["adversarial_head_predicted_dice", "quality"] == "DSC"
    assert pooled["MAE"].notna().sum() == 4  # the four head outputs estimate a quality; the baselines do not
    assert set(rows["domain"]) >= {"pooled", "GE", "Philips"}


def test_calib_predict_confidence_flags_cases_for_review(tiny_dataset, heads, tmp_path):
    tiny_dataset.activate()
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    for channel in (0, 1):
        shutil.copy(tiny_dataset.raw / "imagesTr" / f"C2_000_{channel:04d}.nii.gz", incoming)
    common = ["-d", 511, "-f", 0, "--split", "scanner", "-i", incoming, "--device", "cpu", "--disable-tta"]
    output = run_cli(predict_cli.main, [*common, "-m", "nnunet_dropout", "-o", tmp_path / "out", "--confidence",
                                        "--flag-below", 1.0]).output
    assert "adversarial head predicted dice" in output
    assert "warning: C2_000: predicted Dice" in output and "review this scan" in output
    scores = json.loads((tmp_path / "out" / "confidence.json").read_text())["C2_000"]
    assert "plain_head_predicted_nsd" in scores
    quiet = run_cli(predict_cli.main, [*common, "-m", "nnunet_dropout", "-o", tmp_path / "q", "--confidence",
                                       "--flag-below", 0.0]).output
    assert "warning" not in quiet
    refused = run_cli(predict_cli.main, [*common, "-m", "confidence_head", "-o", tmp_path / "x"], expect_ok=False)
    assert refused.exit_code == 1 and "not a segmentation model" in refused.output
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("args, message", [
    ([511, "3d_fullres", "confidence_head", 0, "--split", "scanner"], "needs --base METHOD"),
    ([511, "3d_fullres", "confidence_head", 0, "--base", "samft"], "attaches to an nnU-Net U-Net"),
    ([511, "3d_fullres", "confidence_head", 2, "--split", "scanner", "--base", "calunet"],
     "no finished calunet run"),
    ([511, "3d_fullres", "nnunet", 0, "--no-adversarial"], "apply to confidence_head"),
])
def test_bad_head_requests_give_one_clear_message(tiny_dataset, args, message):
    tiny_dataset.activate()
    result = run_cli(train_cli.main, args, expect_ok=False)
    assert result.exit_code != 0 and message in result.output
    assert "Traceback" not in result.output


def test_adversarial_step_keeps_the_base_and_buffers_the_perturbed_batch(tiny_dataset, heads):
    """One warm-up-free trainer, two steps on fixed batches: the base weights stay bit-identical, the buffer
    holds x − α·∇C/(‖∇C‖² + ε) of the first batch, and the second step feeds exactly those to the network."""
    from calibnet.paths import setup_data_roots
    from calibnet.methods import get_method
    from calibnet.launch.training_run import prepare_trainer
    from calibnet.runs import RunSpec, read_run

    tiny_dataset.activate()
    roots = setup_data_roots()
    trainer, *_ = prepare_trainer(RunSpec(511, "3d_fullres", "confidence_head", 0, "scanner"), roots.preprocessed,
                                  roots.results, "cpu", folder=tiny_dataset.data_dir / "scratch_head")
    base = heads["base"]
    trainer.attach_base(get_method("nnunet_dropout").trainer_class(), base / "checkpoint_final.pth", read_run(base))
    trainer.warmup_batches = 0
    trainer.initialize()
    frozen = {k: v.clone() for k, v in torch.load(base / "checkpoint_final.pth", weights_only=False)
              ["network_weights"].items()}
    head_before = {k: v.clone() for k, v in trainer.head.state_dict().items()}
    patch = trainer.configuration_manager.patch_size
    generator = torch.Generator().manual_seed(0)
    batches = [{"data": torch.randn((2, 2, *patch), generator=generator),
                "target": (torch.rand((2, 1, *patch), generator=generator) > 0.8).float()} for _ in range(2)]
    seen = []
    trainer.network.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    trainer.train_step(batches[0])
    buffered = trainer.buffer.batch
    assert buffered.inputs.shape == batches[0]["data"].shape
    assert torch.equal(buffered.targets, batches[0]["target"])
    assert not torch.equal(buffered.inputs, batches[0]["data"])
    # recompute the perturbation from the head's state before the update, as the step did
    check = trainer.head.__class__(**trainer.head_config)
    check.load_state_dict(head_before)
    x = batches[0]["data"].clone().requires_grad_(True)
    trainer.network(x)
    score = check(trainer._features).mean(1)
    (grad,) = torch.autograd.grad(score.sum(), x)
    norm2 = grad.pow(2).flatten(1).sum(1).view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(buffered.inputs, (x - 0.8 * grad / (norm2 + 1e-8)).detach(), rtol=1e-4, atol=1e-5)
    seen.clear()
    trainer.train_step(batches[1])
    assert torch.equal(seen[0][:2], batches[1]["data"]) and torch.equal(seen[0][2:], buffered.inputs)
    assert trainer.alpha != 0.8
    for name, value in trainer.network.state_dict().items():
        assert torch.equal(value, frozen[name]), f"base weight {name} changed"
    assert any(not torch.equal(v, head_before[k]) for k, v in trainer.head.state_dict().items())


def test_feature_capture_assembles_unmirrored_tiles_over_the_case():
    from calibnet.inference.confidence_heads import FeatureCapture

    class Network(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.decoder = torch.nn.Module()
            self.decoder.stages = torch.nn.ModuleList([torch.nn.AvgPool3d(2), torch.nn.Identity()])

        def forward(self, x):
            return self.decoder.stages[1](self.decoder.stages[0](x))

    class Predictor:  # nnU-Net's call pattern: one call per tile, then its mirrored copies
        def __init__(self):
            self.network = Network()

        def _internal_predict_sliding_window_return_logits(self, data, slicers, do_on_device=True):
            for slicer in slicers:
                self._internal_maybe_mirror_and_predict(data[slicer][None])

        def _internal_maybe_mirror_and_predict(self, x):
            self.network(x)
            self.network(torch.flip(x, (2, 4)))

    predictor = Predictor()
    capture = FeatureCapture(predictor, expected_channels=1)
    data = torch.arange(8 * 8 * 12, dtype=torch.float32).reshape(1, 8, 8, 12)
    slicers = [(slice(None), slice(0, 8), slice(0, 8), slice(s, s + 8)) for s in (0, 4)]
    predictor._internal_predict_sliding_window_return_logits(data, slicers)
    assert len(capture.tiles) == 2
    torch.testing.assert_close(capture.case_features(), torch.nn.functional.avg_pool3d(data[None], 2))
    wrong = FeatureCapture(Predictor(), expected_channels=4)
    wrong.tiles, wrong.slicers, wrong.shape = capture.tiles, capture.slicers, capture.shape
    from calibnet.errors import CalibnetError
    with pytest.raises(CalibnetError, match="head expects 4"):
        wrong.case_features()


def test_early_stopping_keeps_the_best_head(tiny_dataset, heads):
    """Validation loss that rises every epoch: training stops after ``patience`` epochs without improvement
    and the final head is the best (first) epoch's."""
    import numpy as np

    from calibnet.paths import setup_data_roots
    from calibnet.methods import get_method
    from calibnet.launch.training_run import _run_training, prepare_trainer
    from calibnet.runs import RunSpec, read_run

    tiny_dataset.activate()
    roots = setup_data_roots()
    folder = tiny_dataset.data_dir / "early_stop_head"
    trainer, *_ = prepare_trainer(RunSpec(511, "3d_fullres", "confidence_head", 0, "scanner"), roots.preprocessed,
                                  roots.results, "cpu", folder=folder)
    trainer.output_folder_base = str(folder)
    base = heads["base"]
    trainer.attach_base(get_method("nnunet_dropout").trainer_class(), base / "checkpoint_final.pth", read_run(base))
    trainer.adversarial, trainer.patience = False, 2
    trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch = 6, 1, 1
    trainer.validation_step = lambda batch: {"loss": np.array(float(trainer.current_epoch))}
    _run_training(trainer, num_workers=0)
    history = json.loads((folder / "head_training.json").read_text())
    assert [e["epoch"] for e in history["epochs"]] == [0, 1, 2]
    assert history["stopped_early"] and history["best_epoch"] == 0
    final = torch.load(folder / "checkpoint_final.pth", weights_only=True)
    best = torch.load(folder / "checkpoint_best.pth", weights_only=True)
    assert final["best_epoch"] == 0
    for name, value in best["head_weights"].items():
        assert torch.equal(final["head_weights"][name], value)


SEED_2D = 11  # a seed of its own, so no other test's 2d nnunet run is shared


def test_2d_head_trains_on_slices_and_scores_every_val_and_test_case(tiny_dataset):
    """2d end to end: an nnunet base on the 2d configuration, an adversarial head on its frozen network (2-D
    convolutions on slice patches), per-case scores in the base's val/test confidence.json, and rows in
    calib_evaluate's failure-detection table."""
    import math

    import pandas as pd

    tiny_dataset.activate()
    seed = ["--seed", SEED_2D]
    tiny = ["--iters-per-epoch", 2, "--device", "cpu", "--num-workers", 0]
    run_cli(train_cli.main, [511, "2d", "nnunet", 0, "--split", "scanner", *seed, "--epochs", 1, *tiny,
                             "--disable-tta"])
    output = run_cli(train_cli.main, [511, "2d", "confidence_head", 0, "--split", "scanner", "--base", "nnunet", *seed,
                                      "--warmup-batches", 1, "--epochs", 1, *tiny]).output
    base = (tiny_dataset.data_dir / "results" / "Dataset511_Tiny" / "nnUNetTrainerCalib__CalibPlans__2d"
            / f"scanner_fold0_seed{SEED_2D}")
    folder = base / "confidence_head"
    assert f"trained confidence head: {folder}" in output
    checkpoint = torch.load(folder / "checkpoint_final.pth", weights_only=True)
    assert checkpoint["head_config"]["dims"] == 2 and checkpoint["outputs"] == ["dice:lesion", "nsd:lesion"]
    assert checkpoint["head_weights"]["features.0.weight"].ndim == 4  # Conv2d
    history = json.loads((folder / "head_training.json").read_text())
    assert [e["adversarial_batches"] for e in history["epochs"]] == [1]  # batch 0 warm-up, batch 1 adversarial
    assert math.isfinite(history["epochs"][0]["val_mse"])
    splits = json.loads((tiny_dataset.preprocessed / "calib_splits.json").read_text())
    fold = splits["scanner"]["folds"][0]
    for role in ("val", "test"):
        confidence = json.loads((base / "predictions" / role / "confidence.json").read_text())
        assert sorted(confidence) == sorted(fold[role])
        for case, scores in confidence.items():
            for kind in ("dice", "nsd"):
                value = scores[f"adversarial_head_predicted_{kind}"]
                assert math.isfinite(value) and 0 < value < 1, (case, kind, value)
            assert "mean_max_probability_foreground" in scores, "adding head scores must keep the base's scores"
    run_cli(evaluate_cli.main, ["--split", "scanner", "--methods", "nnunet", "--configuration", "2d",
                                "--seeds", SEED_2D])
    rows = pd.read_csv(tiny_dataset.data_dir / "results" / "Dataset511_Tiny" / "evaluation" / "scanner"
                       / "failure_detection.csv")
    pooled = rows[rows["domain"] == "pooled"].set_index("score")
    assert pooled.loc["adversarial_head_predicted_dice", "quality"] == "DSC"
    assert pooled.loc["adversarial_head_predicted_nsd", "quality"] == "NSD"
    assert pooled.loc[["adversarial_head_predicted_dice", "adversarial_head_predicted_nsd"], "MAE"].notna().all()
