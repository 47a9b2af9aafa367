"""SAM 2 methods (sam2_zeroshot, sam2ft) and SafeClick with its ablations: random hiera_t at 128² on CPU."""
import json

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import ndimage

from calibnet.cli import evaluate as evaluate_cli
from calibnet.cli import train as train_cli
from calibnet.errors import CalibnetError
from calibnet.prompt_quality import object_radius
from calibnet.prompts import slice_box
from calibnet.methods import get_method
from calibnet.trainers.nnUNetTrainerSAM2 import imperfect_prompt
from calibnet.networks.safeclick import ConsensusReasoning, SafeClickOptions, SafeClickSegmenter
from calibnet.networks.sam2_backbone import (Sam2Config, Sam2SliceSegmenter, build_sam2_model, resolve_sam2_config)
from conftest import run_cli

SIZE = 128
CONFIG = Sam2Config(image_size=SIZE)
FOLD = 1
SHORT = ["--split", "loco", "--epochs", 1, "--iters-per-epoch", 2, "--device", "cpu", "--disable-tta",
         "--sam2-image-size", SIZE]
ABLATIONS = [("--no-e1", "nnUNetTrainerSafeClickNoE1", "e1"), ("--no-e2", "nnUNetTrainerSafeClickNoE2", "e2"),
             ("--no-crl", "nnUNetTrainerSafeClickNoCRL", "crl")]
PROMPTS = [{"points": [[10.0, 12.0]], "labels": [1]}, {"box": (5.0, 6.0, 20.0, 24.0)},
           {"points": [[14.0, 14.0], [2.0, 2.0]], "labels": [1, 0], "box": (8.0, 8.0, 22.0, 20.0)}, None]


def _run(tiny_dataset, trainer):
    return (tiny_dataset.data_dir / "results" / "Dataset511_Tiny" / f"{trainer}__CalibPlans__3d_fullres"
            / f"loco_fold{FOLD}_seed42")


def _decode(segmenter, slices):
    with torch.no_grad():
        return segmenter.decode(segmenter.embed(slices), PROMPTS, tuple(slices.shape[-2:]))


# --- the plug-in --------------------------------------------------------------------------------------

@pytest.mark.parametrize("options", [SafeClickOptions(), SafeClickOptions(e1=False), SafeClickOptions(e2=False),
                                     SafeClickOptions(crl=False)], ids=lambda o: o.describe())
def test_plugin_starts_as_exactly_the_sam2_decoder(options):
    slices = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    plain = Sam2SliceSegmenter(build_sam2_model(CONFIG, load_weights=False)).eval()
    safeclick = SafeClickSegmenter(build_sam2_model(CONFIG, load_weights=False), options=options).eval()
    expected, got = _decode(plain, slices), _decode(safeclick, slices)
    assert torch.equal(got, expected)
    # the identity comes from the zero-initialised fusion convolution: with it perturbed, the output moves
    torch.nn.init.normal_(safeclick.plugin.fusion_conv.weight, std=0.1)
    assert (_decode(safeclick, slices)[:3] - expected[:3]).abs().max() > 1e-3


def test_middle_block_feature_reaches_e1_only_when_e1_is_on():
    with_e1 = SafeClickSegmenter(build_sam2_model(CONFIG, load_weights=False))
    assert with_e1.feature_shapes()[3] == (384, 8, 8)  # hiera_t block 6 of 12: stage 3, width 384, stride 16
    without = SafeClickSegmenter(build_sam2_model(CONFIG, load_weights=False), options=SafeClickOptions(e1=False))
    assert len(without.feature_shapes()) == 3 and without.plugin.e1 is None
    final = torch.randn(1, 256, 8, 8)
    middle = torch.randn(1, 384, 8, 8)
    for segmenter, moves in ((with_e1, True), (without, False)):
        a = segmenter.plugin.consensus(final, middle)
        b = segmenter.plugin.consensus(final, middle + 1 if moves else None)
        assert torch.equal(a, b)  # zero fusion conv: no effect yet
        torch.nn.init.normal_(segmenter.plugin.fusion_conv.weight, std=0.1)
        a = segmenter.plugin.consensus(final, middle)
        b = segmenter.plugin.consensus(final, middle + 1 if moves else None)
        assert (not torch.allclose(a, b)) == moves


@pytest.mark.parametrize("alpha", [1.0, 0.25])
def test_consensus_reasoning_is_eqs_7_and_8_by_hand(alpha):
    rng = np.random.default_rng(3)
    x1, x2 = rng.normal(size=(1, 3, 2, 2)), rng.normal(size=(1, 3, 2, 2))
    phi1, phi2 = x1.reshape(3, 4), x2.reshape(3, 4)

    def softmax_rows(a):
        e = np.exp(a - a.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    def contrastive(a, b):  # Eq. 7 with the global maximum times the all-ones matrix
        energy = a @ b.T
        return softmax_rows(energy.max() * np.ones_like(energy) - energy)

    expected = ((contrastive(phi2, phi2) + alpha * contrastive(phi1, phi2)) / (1 + alpha)) @ phi2 + phi2
    crl = ConsensusReasoning(alpha).double()
    assert float(crl.alpha.detach()) == pytest.approx(alpha)
    got = crl(torch.from_numpy(x2), torch.from_numpy(x1))
    np.testing.assert_allclose(got.detach().numpy().reshape(3, 4), expected, atol=1e-8)  # α is stored in float32
    self_only = contrastive(phi2, phi2) @ phi2 + phi2  # without E1: the self term alone
    np.testing.assert_allclose(crl(torch.from_numpy(x2)).detach().numpy().reshape(3, 4), self_only, rtol=1e-10)


def test_imperfect_training_prompts_follow_the_papers_ranges():
    mask = np.zeros((40, 40), bool)
    mask[10:30, 8:24] = True
    centre, radius = np.array(ndimage.center_of_mass(mask)), object_radius(mask)
    truth = np.array(slice_box(mask), float)
    truth_size = truth[2:] - truth[:2] + 1
    rng = np.random.default_rng(0)
    kinds = {"points": 0, "box": 0}
    for _ in range(300):
        prompt = imperfect_prompt(mask, rng)
        if "points" in prompt:
            kinds["points"] += 1
            assert prompt["labels"] == [1]
            assert np.linalg.norm(np.array(prompt["points"][0]) - centre) <= radius + 1e-6
        else:
            kinds["box"] += 1
            box = np.array(prompt["box"])
            scale = (box[2:] - box[:2] + 1) / truth_size
            assert np.allclose(scale[0], scale[1], atol=1e-9) and 0.5 - 1e-9 <= scale[0] <= 1.5 + 1e-9
            np.testing.assert_allclose((box[:2] + box[2:]) / 2, (truth[:2] + truth[2:]) / 2)
    assert min(kinds.values()) > 100


# --- checkpoints --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sam2_checkpoint(tmp_path_factory):
    """A SAM 2.1 hiera_t checkpoint in the release format ({"model": state dict}), random weights."""
    from sam2.build_sam import build_sam2
    torch.manual_seed(1)
    model = build_sam2("configs/sam2.1/sam2.1_hiera_t.yaml", None, device="cpu")
    path = tmp_path_factory.mktemp("sam2") / "sam2.1_hiera_tiny.pt"
    torch.save({"model": model.state_dict()}, path)
    return path, model.state_dict()


def test_a_sam2_checkpoint_is_recognised_and_loaded(sam2_checkpoint):
    path, state = sam2_checkpoint
    config, warning = resolve_sam2_config(None, str(path), SIZE)
    assert warning is None and config == Sam2Config("hiera_t", str(path), SIZE, "2.1") and config.pretrained
    model = build_sam2_model(config)
    key = "image_encoder.trunk.blocks.3.attn.qkv.weight"
    assert torch.equal(model.state_dict()[key], state[key]) and model.memory_attention is None


def test_wrong_checkpoints_are_refused_clearly(sam2_checkpoint, tmp_path):
    path, state = sam2_checkpoint
    with pytest.raises(CalibnetError, match="does not exist"):
        resolve_sam2_config(None, str(tmp_path / "missing.pt"), SIZE)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CalibnetError, match="cannot be read as a SAM 2 checkpoint"):
        resolve_sam2_config(None, str(garbage), SIZE)
    sam1 = tmp_path / "sam_vit_b.pth"
    torch.save({"image_encoder.patch_embed.proj.weight": torch.zeros(768, 3, 16, 16)}, sam1)
    with pytest.raises(CalibnetError, match="not a SAM 2 checkpoint.*--sam-checkpoint"):
        resolve_sam2_config(None, str(sam1), SIZE)
    with pytest.raises(CalibnetError, match="holds a SAM 2 hiera_t checkpoint, not hiera_l"):
        resolve_sam2_config("hiera_l", str(path), SIZE)
    broken = tmp_path / "broken.pt"
    torch.save({"model": {k: v for k, v in state.items() if "sam_mask_decoder" not in k}}, broken)
    with pytest.raises(CalibnetError, match="does not fit SAM 2.1 hiera_t"):
        build_sam2_model(resolve_sam2_config(None, str(broken), SIZE)[0])
    with pytest.raises(CalibnetError, match="multiple of 32"):
        resolve_sam2_config(None, None, 100)


# --- calib_train end to end -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def safeclick_run(tiny_dataset):
    tiny_dataset.activate()
    output = run_cli(train_cli.main, [511, "3d_fullres", "safeclick", FOLD, *SHORT, "--prompts", "P0",
                                      "--prompts", "P50", "--prompts", "B100", "--prompts", "B150"]).output
    return output, _run(tiny_dataset, "nnUNetTrainerSafeClick")


@pytest.mark.slow
def test_safeclick_trains_only_the_decoder_and_plugin(safeclick_run):
    output, folder = safeclick_run
    assert "SAM 2.1 hiera_t at 128², not pretrained" in output
    weights = torch.load(folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)["network_weights"]
    fresh = SafeClickSegmenter(build_sam2_model(CONFIG, load_weights=False)).state_dict()
    assert set(weights) == set(fresh)
    frozen = [k for k in fresh if k.startswith(("sam.image_encoder.", "sam.sam_prompt_encoder.",
                                                "sam.sam_mask_decoder.conv_s0", "sam.sam_mask_decoder.conv_s1"))
              or k == "sam.no_mem_embed"]
    assert len(frozen) > 100 and all(torch.equal(weights[k], fresh[k]) for k in frozen)
    plugin = [k for k in fresh if k.startswith("sam.sam_mask_decoder.transformer.") and ".e3." not in k]
    decoder = [k for k in fresh if k.startswith("sam.sam_mask_decoder.") and k not in plugin and k not in frozen]
    for keys in (plugin, decoder):
        assert any(not torch.equal(weights[k], fresh[k]) for k in keys if fresh[k].is_floating_point())
    assert not torch.equal(weights["sam.sam_mask_decoder.transformer.fusion_conv.weight"],
                           torch.zeros_like(fresh["sam.sam_mask_decoder.transformer.fusion_conv.weight"]))
    record = json.loads((folder / "calibnet_run.json").read_text())
    assert record["backbone"] == {"model": "hiera_t", "checkpoint": None, "image_size": SIZE, "version": "2.1"}
    assert record["note"] == "SAM 2.1 hiera_t at 128², not pretrained"
    log = next(folder.glob("training_log_*.txt")).read_text()
    assert "embedding cache" in log and "SafeClick:" in log


@pytest.mark.slow
def test_safeclick_predictions_land_in_the_common_layout_with_the_setting(tiny_dataset, safeclick_run):
    _, folder = safeclick_run
    splits = json.loads((tiny_dataset.preprocessed / "calib_splits.json").read_text())["loco"]["folds"][FOLD]
    for setting in (None, "P0", "P50", "B100", "B150"):
        for role in ("val", "test"):
            predictions = folder / "predictions" / role if setting is None else \
                folder / "predictions" / f"prompts_{setting}" / role
            assert sorted(p.name[:-7] for p in predictions.glob("*.nii.gz")) == sorted(splits[role])
            probabilities = np.load(predictions / f"{splits[role][0]}.npz")["probabilities"]
            assert probabilities.shape == (2, 32, 32, 32)
            if setting is not None:
                assert json.loads((predictions / "prompts.json").read_text())["setting"] == setting


@pytest.mark.slow
@pytest.mark.parametrize("flag, trainer, removed", ABLATIONS)
def test_each_ablation_builds_trains_a_step_and_predicts(tiny_dataset, flag, trainer, removed):
    tiny_dataset.activate()
    output = run_cli(train_cli.main, [511, "3d_fullres", "safeclick", FOLD, *SHORT, flag, "--prompts", "P25"]).output
    folder = _run(tiny_dataset, trainer)
    assert f"method safeclick_no_{removed}" in output
    record = json.loads((folder / "calibnet_run.json").read_text())
    assert record["spec"]["method"] == f"safeclick_no_{removed}" and record["network_options"][removed] is False
    weights = torch.load(folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)["network_weights"]
    assert not any(k.startswith(f"sam.sam_mask_decoder.transformer.{removed}.") for k in weights)
    for role in ("val", "test"):
        assert (folder / "predictions" / "prompts_P25" / role / "confidence.json").is_file()


@pytest.mark.slow
def test_sam2_baselines_train_or_not_and_evaluate_in_the_table_2_layout(tiny_dataset, safeclick_run):
    tiny_dataset.activate()
    settings = ["--prompts", "P0", "--prompts", "P50", "--prompts", "B100", "--prompts", "B150"]
    run_cli(train_cli.main, [511, "3d_fullres", "sam2ft", FOLD, *SHORT, *settings])
    output = run_cli(train_cli.main, [511, "3d_fullres", "sam2_zeroshot", FOLD, *SHORT, *settings]).output
    assert "not pretrained" in output
    zero_shot = torch.load(_run(tiny_dataset, "nnUNetTrainerSAM2ZeroShot") / "checkpoint_final.pth",
                           map_location="cpu", weights_only=False)["network_weights"]
    fresh = Sam2SliceSegmenter(build_sam2_model(CONFIG, load_weights=False)).state_dict()
    assert all(torch.equal(zero_shot[k], fresh[k]) for k in fresh)
    run_cli(evaluate_cli.main, ["--split", "loco", "--folds", FOLD, "--methods", "sam2_zeroshot,sam2ft,safeclick"])
    evaluation = tiny_dataset.data_dir / "results" / "Dataset511_Tiny" / "evaluation" / "loco"
    table = pd.read_csv(evaluation / "prompt_robustness.csv")
    assert list(table["method"]) == ["safeclick", "sam2_zeroshot", "sam2ft"]
    assert list(table.columns) == ["method", "DSC P0", "DSC P50", "DSC Avg. IP points", "DSC B100", "DSC B150",
                                   "DSC Avg. IP boxes", "ECE Avg. IP points", "ECE Avg. IP boxes",
                                   "Brier Avg. IP points", "Brier Avg. IP boxes"]
    per_case = pd.read_csv(evaluation / "per_case.csv")
    expected = per_case[(per_case["method"] == "sam2ft [B150]") & (per_case["role"] == "target")]["DSC"].mean()
    assert table.set_index("method").loc["sam2ft", "DSC Avg. IP boxes"] == pytest.approx(expected)
    assert "Robustness to imperfect prompts" in (evaluation / "report.md").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["safeclick", "--no-e1", "--no-e2"], "one ablation at a time"),
    (["sam2ft", "--no-crl"], "ablate parts of safeclick, not sam2ft"),
    (["safeclick", "--sam-model", "tiny"], "use --sam2-model/--sam2-checkpoint"),
    (["samft", "--sam2-model", "hiera_t"], "apply to SAM 2 methods"),
    (["safeclick", "--sam2-checkpoint", "/nonexistent/sam2.pt"], "does not exist"),
    (["safeclick", "--sam2-image-size", "100"], "multiple of 32"),
    (["safeclick", "--ugpa-k", "2"], "--ugpa-k apply to medsam_u, not safeclick"),
    (["nnunet", "--ugmp-sigma", "2"], "--ugmp-sigma apply to medsam_u, not nnunet"),
])
def test_bad_sam2_requests_get_one_message_and_leave_no_run(tiny_dataset, args, message):
    tiny_dataset.activate()
    method, *flags = args
    result = run_cli(train_cli.main, [511, "3d_fullres", method, 2, "--device", "cpu", *flags], expect_ok=False)
    assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output
    results = tiny_dataset.data_dir / "results" / "Dataset511_Tiny"
    trainer = get_method(method).class_name
    assert not (results / f"{trainer}__CalibPlans__3d_fullres" / "loco_fold2_seed42").exists()


def test_missing_sam2_package_is_reported_with_the_install_command(monkeypatch):
    import calibnet.methods as methods

    def no_sam2(name):
        raise ModuleNotFoundError("No module named 'sam2'", name="sam2")

    monkeypatch.setattr(methods.importlib, "import_module", no_sam2)
    with pytest.raises(CalibnetError, match="needs the sam2 package.*--no-build-isolation sam2==1.1.0"):
        methods.get_method("safeclick").trainer_class()


@pytest.mark.slow
def test_calib_predict_runs_a_safeclick_model_on_new_images(tiny_dataset, safeclick_run, tmp_path):
    from calibnet.cli import predict as predict_cli

    tiny_dataset.activate()
    images = tmp_path / "in"
    images.mkdir()
    for channel in ("0000", "0001"):
        source = tiny_dataset.raw / "imagesTr" / f"C1_000_{channel}.nii.gz"
        (images / source.name).write_bytes(source.read_bytes())
    output = run_cli(predict_cli.main, ["-d", 511, "-m", "safeclick", "-f", FOLD, "-i", images, "-o", tmp_path / "out",
                                        "--prompts-from", tiny_dataset.raw / "labelsTr", "--prompts", "B150",
                                        "--disable-tta"]).output
    assert "SAM 2.1 hiera_t at 128², not pretrained" in output
    assert json.loads((tmp_path / "out" / "prompts.json").read_text())["setting"] == "B150"
    assert np.load(tmp_path / "out" / "C1_000.npz")["probabilities"].shape == (2, 32, 32, 32)
