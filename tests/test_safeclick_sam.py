"""SafeClick on segment-anything's decoder: the pretrained LiteMedSAM (one slice, each model built once per
module: a TinyViT forward takes ~2 s on 2 cores) and the tiny SAM (calib_train end to end)."""
import json
import re

import numpy as np
import pytest
import torch

from calibnet.cli import train as train_cli
from calibnet.errors import CalibnetError
from calibnet.methods import get_method, method_variant
from calibnet.networks.safeclick import SafeClickOptions
from calibnet.networks.safeclick_sam import SafeClickSamSegmenter, encoder_blocks, middle_block
from calibnet.networks.sam_backbone import SamConfig, SamSliceSegmenter, build_sam, resolve_sam_config
from conftest import run_cli

SHAPE = (48, 64)
PROMPTS = [{"points": [[20, 30]], "labels": [1]}, {"box": (11, 18, 29, 41)},
           {"points": [[20, 30], [2, 2]], "labels": [1, 0], "box": (9, 16, 31, 44)}]
OPTIONS = [SafeClickOptions(), SafeClickOptions(e1=False), SafeClickOptions(e2=False), SafeClickOptions(crl=False)]
FOLD = 1
SHORT = ["--split", "loco", "--epochs", 1, "--iters-per-epoch", 2, "--device", "cpu", "--disable-tta",
         "--backbone", "litemedsam", "--sam-model", "tiny"]


@pytest.fixture(scope="module")
def lite():
    """The packaged LiteMedSAM plain and with the plug-in, and one slice's embeddings from each (two forwards)."""
    config = resolve_sam_config(None, None)[0]
    plain = SamSliceSegmenter(build_sam(config), unit_intensities=True).eval()
    safeclick = SafeClickSamSegmenter(build_sam(config), unit_intensities=True).eval()
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:SHAPE[0], :SHAPE[1]]
    image = rng.normal(0, 0.3, SHAPE) + 2.0 * (((yy - 20) ** 2 / 81 + (xx - 30) ** 2 / 144) < 1)
    image = torch.from_numpy(np.stack([image] * 3)[None]).float()
    with torch.no_grad():
        return plain, safeclick, image, plain.embed(image), safeclick.embed(image)


def _decode(segmenter, embedding, prompts=PROMPTS):
    with torch.no_grad():
        return segmenter.decode(embedding.expand(len(prompts), *embedding.shape[1:]), prompts, SHAPE)


# --- where E1 reads -----------------------------------------------------------------------------------

def test_e1_reads_the_sixth_of_tinyvits_twelve_blocks(lite):
    plain, safeclick, image, embedding, packed = lite
    encoder = safeclick.image_encoder
    assert len(encoder_blocks(encoder)) == 12 and safeclick.middle_index == 5
    assert encoder_blocks(encoder)[5] is encoder.layers[2].blocks[1]  # 2 MBConv, 2, then the 6-block stage
    assert safeclick.middle_shape == (160, 64, 64) and safeclick.feature_shapes() == [(256, 64, 64), (160, 64, 64)]
    assert packed.shape == (1, (256 + 160) * 64 * 64) and safeclick.embedding_layout == "sam+middle"
    image_part, middle = safeclick.unpack(packed)
    assert torch.equal(image_part, embedding)  # the hook leaves the image embedding as it is
    with torch.no_grad():  # the same block's output, computed by hand from TinyViT's modules
        x = encoder.layers[1](encoder.layers[0](encoder.patch_embed(plain.slices_to_sam_input(image))))
        x = encoder.layers[2].blocks[1](encoder.layers[2].blocks[0](x))
    torch.testing.assert_close(middle, x.transpose(1, 2).reshape(1, 160, 64, 64), rtol=0, atol=1e-5)
    assert safeclick.plugin.transform[0].stride == (1, 1)  # x_i is already at the embedding's 64×64


def test_e1_of_a_vit_reads_its_middle_block():
    tiny = SafeClickSamSegmenter(build_sam(SamConfig()))  # ViT of 2 blocks: the first, 64 wide, on the 8×8 grid
    assert tiny.middle_index == 0 and tiny.middle_shape == (64, 8, 8)
    from segment_anything.modeling import ImageEncoderViT
    deeper = ImageEncoderViT(img_size=64, patch_size=16, embed_dim=32, depth=6, num_heads=2, out_chans=32)
    assert middle_block(deeper) == (2, (32, 4, 4))
    with pytest.raises(CalibnetError, match="cannot find the blocks"):
        middle_block(torch.nn.Conv2d(3, 3, 1))


# --- identity at initialisation -----------------------------------------------------------------------

def test_plugin_starts_as_exactly_litemedsams_decoder(lite):
    plain, safeclick, _, embedding, packed = lite
    expected = _decode(plain, embedding)
    assert torch.equal(_decode(safeclick, packed), expected)  # points, a box, both: max abs diff 0
    weight = safeclick.plugin.fusion_conv.weight
    try:  # the identity comes from the zero-initialised fusion convolution: perturbed, the output moves
        torch.nn.init.normal_(weight, std=0.1)
        assert (_decode(safeclick, packed, PROMPTS[2:]) - expected[2:]).abs().max() > 1e-3
    finally:
        torch.nn.init.zeros_(weight)


@pytest.mark.parametrize("options", OPTIONS[1:], ids=lambda o: o.describe())
def test_each_ablation_starts_as_exactly_litemedsams_decoder(lite, options):
    plain, _, _, embedding, packed = lite
    ablated = SafeClickSamSegmenter(build_sam(resolve_sam_config(None, None)[0]), unit_intensities=True,
                                    options=options).eval()
    given = packed if options.e1 else embedding  # without E1 the embedding is the plain SAM one
    assert ablated.embedding_layout == ("sam+middle" if options.e1 else "sam")
    assert torch.equal(_decode(ablated, given, PROMPTS[2:]), _decode(plain, embedding, PROMPTS[2:]))


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: o.describe())
def test_plugin_on_the_tiny_sam_starts_as_its_decoder(options):
    slices = torch.randn(2, 3, 32, 40, generator=torch.Generator().manual_seed(0))
    plain = SamSliceSegmenter(build_sam(SamConfig())).eval()
    safeclick = SafeClickSamSegmenter(build_sam(SamConfig()), options=options).eval()
    with torch.no_grad():
        expected = plain.decode(plain.embed(slices), PROMPTS[:2], (32, 40))
        assert torch.equal(safeclick.decode(safeclick.embed(slices), PROMPTS[:2], (32, 40)), expected)


# --- training -----------------------------------------------------------------------------------------

def _gradients(safeclick, packed) -> dict:
    safeclick.zero_grad(set_to_none=True)
    logits = safeclick.decode(packed, PROMPTS[2:], SHAPE)
    torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.ones_like(logits)).backward()
    return {name: p.grad for name, p in safeclick.named_parameters() if p.requires_grad}


def test_gradients_reach_the_plugin_and_the_decoder_only(lite):
    _, safeclick, _, _, packed = lite
    plugin = {id(p) for p in safeclick.plugin_parameters()}
    named = dict(safeclick.named_parameters())
    assert not any(p.requires_grad for p in safeclick.image_encoder.parameters())
    assert not any(p.requires_grad for p in safeclick.prompt_encoder.parameters())
    grads = _gradients(safeclick, packed)
    assert set(grads) == {n for n, p in named.items() if n.startswith("sam.mask_decoder.")}
    nonzero = {n for n, g in grads.items() if g is not None and g.abs().max() > 0}
    # at initialisation only the zero convolution is reached inside the plug-in (its output is 0 · branch)
    assert {n for n in nonzero if id(named[n]) in plugin} == {"sam.mask_decoder.transformer.fusion_conv.weight",
                                                               "sam.mask_decoder.transformer.fusion_conv.bias"}
    weight = safeclick.plugin.fusion_conv.weight
    try:  # once the fusion has learnt something, every part of the plug-in gets a gradient
        torch.nn.init.normal_(weight, std=0.01)
        grads = _gradients(safeclick, packed)
        for part in ("transform.0.weight", "e1.attention.in_proj_weight", "e1.mlp.0.weight",
                     "e2.attention.in_proj_weight", "e2.mlp.2.weight", "crl.rho", "fusion_norm.weight"):
            assert grads[f"sam.mask_decoder.transformer.{part}"].abs().max() > 0, part
        assert grads["sam.mask_decoder.transformer.e3.layers.0.mlp.lin1.weight"].abs().max() > 0  # E3 trains too
    finally:
        torch.nn.init.zeros_(weight)
        safeclick.zero_grad(set_to_none=True)


# --- the registry and calib_train ------------------------------------------------------------------------

def test_backbone_flag_picks_the_litemedsam_variant_then_the_ablation():
    assert method_variant("safeclick", "litemedsam") == "safeclick_lite"
    assert method_variant("safeclick", "litemedsam", ("crl",)) == "safeclick_lite_no_crl"
    assert method_variant("safeclick_lite", None, ("e1",)) == "safeclick_lite_no_e1"
    assert method_variant("safeclick", "sam2") == "safeclick" and method_variant("safeclick_lite", "sam2") == "safeclick"
    assert method_variant("samft", "litemedsam") == "samft"  # already on it
    assert method_variant("safeclick") == "safeclick"
    with pytest.raises(CalibnetError, match=re.escape("--backbone sam2: nnunet has no variant on it (--backbone "
                                                      "applies to sam2ft, safeclick, samft_imperfect, safeclick_lite)")):
        method_variant("nnunet", "sam2")
    with pytest.raises(CalibnetError, match="unknown --backbone 'hiera'"):
        method_variant("safeclick", "hiera")
    lite = get_method("safeclick_lite")
    assert lite.backbone == "sam" and lite.trainer_class().__name__ == "nnUNetTrainerSafeClickLite"
    assert lite.trainer_class().safeclick_options({"e2": False, "seed": 1}) == SafeClickOptions(e2=False)


def test_sam2ft_on_litemedsam_is_safeclick_lites_baseline():
    from calibnet.trainers.nnUNetTrainerSAM import nnUNetTrainerSAMFT
    from calibnet.trainers.nnUNetTrainerSAM2 import ImperfectPromptTraining

    assert method_variant("sam2ft", "litemedsam") == "samft_imperfect"
    assert method_variant("samft_imperfect", "sam2") == "sam2ft"
    assert method_variant("samft_imperfect") == method_variant("samft_imperfect", "litemedsam") == "samft_imperfect"
    with pytest.raises(CalibnetError, match="--no-e1 ablate parts of safeclick, not samft_imperfect"):
        method_variant("sam2ft", "litemedsam", ("e1",))
    baseline = get_method("samft_imperfect")
    assert baseline.backbone == "sam" and baseline.backbone_options == get_method("safeclick_lite").backbone_options
    assert baseline.summary == ("SAM-FT on imperfect prompts with SafeClick's recipe (AdamW): the baseline of "
                                "safeclick_lite")
    assert not baseline.ablations and baseline.own_prompts == get_method("safeclick_lite").own_prompts == "default"
    trainer, lite = baseline.trainer_class(), get_method("safeclick_lite").trainer_class()
    assert trainer.__name__ == "nnUNetTrainerSAMFTImperfect" and issubclass(trainer, nnUNetTrainerSAMFT)
    # safeclick_lite's recipe (prompts, optimiser, schedule) without the plug-in: samft's network
    for name in ("slice_prompts", "configure_optimizers"):
        assert getattr(trainer, name) is getattr(lite, name) is getattr(ImperfectPromptTraining, name)
    assert trainer.network_for.__func__ is nnUNetTrainerSAMFT.network_for.__func__
    assert type(trainer.network_for(SamConfig())) is SamSliceSegmenter


def _run(tiny_dataset, trainer):
    return (tiny_dataset.data_dir / "results" / "Dataset511_Tiny" / f"{trainer}__CalibPlans__3d_fullres"
            / f"loco_fold{FOLD}_seed42")


@pytest.fixture(scope="module")
def lite_run(tiny_dataset):
    tiny_dataset.activate()
    output = run_cli(train_cli.main, [511, "3d_fullres", "safeclick", FOLD, *SHORT, "--prompts", "P50"]).output
    return output, _run(tiny_dataset, "nnUNetTrainerSafeClickLite")


@pytest.mark.slow
def test_safeclick_on_litemedsam_trains_the_decoder_and_plugin_only(tiny_dataset, lite_run):
    output, folder = lite_run
    assert "--backbone litemedsam: method safeclick_lite" in output and "tiny SAM, not pretrained" in output
    weights = torch.load(folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)["network_weights"]
    fresh = SafeClickSamSegmenter(build_sam(SamConfig())).state_dict()
    assert set(weights) == set(fresh)
    frozen = [k for k in fresh if k.startswith(("sam.image_encoder.", "sam.prompt_encoder."))]
    assert len(frozen) > 20 and all(torch.equal(weights[k], fresh[k]) for k in frozen)
    plugin = [k for k in fresh if k.startswith("sam.mask_decoder.transformer.") and ".e3." not in k]
    decoder = [k for k in fresh if k.startswith("sam.mask_decoder.") and k not in plugin]
    for keys in (plugin, decoder):
        assert any(not torch.equal(weights[k], fresh[k]) for k in keys if fresh[k].is_floating_point())
    record = json.loads((folder / "calibnet_run.json").read_text())
    assert record["spec"]["method"] == "safeclick_lite" and record["backbone"]["model"] == "tiny"
    log = next(folder.glob("training_log_*.txt")).read_text()
    assert "SafeClick:" in log and "plug-in parameters" in log
    splits = json.loads((tiny_dataset.preprocessed / "calib_splits.json").read_text())["loco"]["folds"][FOLD]
    for predictions in (folder / "predictions" / "val", folder / "predictions" / "prompts_P50" / "test"):
        role = predictions.name
        assert sorted(p.name[:-7] for p in predictions.glob("*.nii.gz")) == sorted(splits[role])
        assert np.load(predictions / f"{splits[role][0]}.npz")["probabilities"].shape == (2, 32, 32, 32)


@pytest.mark.slow
def test_sam2ft_on_litemedsam_trains_the_decoder_only_on_imperfect_prompts(tiny_dataset):
    tiny_dataset.activate()
    output = run_cli(train_cli.main, [511, "3d_fullres", "sam2ft", FOLD, *SHORT]).output
    assert "--backbone litemedsam: method samft_imperfect (sam2ft on litemedsam)" in output
    assert "tiny SAM, not pretrained" in output
    folder = _run(tiny_dataset, "nnUNetTrainerSAMFTImperfect")
    checkpoint = torch.load(folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    weights, fresh = checkpoint["network_weights"], SamSliceSegmenter(build_sam(SamConfig())).state_dict()
    assert set(weights) == set(fresh)  # samft's network: no plug-in
    frozen = [k for k in fresh if k.startswith(("sam.image_encoder.", "sam.prompt_encoder."))]
    assert len(frozen) > 20 and all(torch.equal(weights[k], fresh[k]) for k in frozen)
    decoder = [k for k in fresh if k.startswith("sam.mask_decoder.") and fresh[k].is_floating_point()]
    assert any(not torch.equal(weights[k], fresh[k]) for k in decoder)
    assert checkpoint["optimizer_state"]["param_groups"][0]["weight_decay"] == 0.01  # AdamW's (samft's Adam: 0)
    record = json.loads((folder / "calibnet_run.json").read_text())
    assert record["spec"]["method"] == "samft_imperfect" and record["backbone"]["model"] == "tiny"
    splits = json.loads((tiny_dataset.preprocessed / "calib_splits.json").read_text())["loco"]["folds"][FOLD]
    for role in ("val", "test"):
        predictions = folder / "predictions" / role
        assert sorted(p.name[:-7] for p in predictions.glob("*.nii.gz")) == sorted(splits[role])
        assert np.load(predictions / f"{splits[role][0]}.npz")["probabilities"].shape == (2, 32, 32, 32)


@pytest.mark.slow
def test_an_ablation_on_litemedsam_trains_without_its_part(tiny_dataset, lite_run):
    tiny_dataset.activate()
    output = run_cli(train_cli.main, [511, "3d_fullres", "safeclick", FOLD, *SHORT, "--no-e1"]).output
    assert "--backbone litemedsam --no-e1: method safeclick_lite_no_e1" in output
    folder = _run(tiny_dataset, "nnUNetTrainerSafeClickLiteNoE1")
    record = json.loads((folder / "calibnet_run.json").read_text())
    assert record["spec"]["method"] == "safeclick_lite_no_e1" and record["network_options"]["e1"] is False
    weights = torch.load(folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)["network_weights"]
    assert not any(k.startswith("sam.mask_decoder.transformer.e1.") for k in weights)
    assert (folder / "predictions" / "test" / "confidence.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["safeclick", "--sam-model", "tiny"], "(or --backbone litemedsam: safeclick_lite)"),
    (["sam2ft", "--sam-model", "tiny"], "(or --backbone litemedsam: samft_imperfect)"),
    (["safeclick", "--backbone", "litemedsam", "--sam2-model", "hiera_t"], "apply to SAM 2 methods"),
    (["safeclick", "--backbone", "litemedsam", "--no-e1", "--no-crl"], "one ablation at a time"),
    (["calsam", "--backbone", "sam2"], "--backbone sam2: calsam has no variant on it"),
])
def test_bad_litemedsam_safeclick_requests_get_one_message(tiny_dataset, args, message):
    tiny_dataset.activate()
    method, *flags = args
    result = run_cli(train_cli.main, [511, "3d_fullres", method, 2, "--device", "cpu", *flags], expect_ok=False)
    assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output
    results = tiny_dataset.data_dir / "results" / "Dataset511_Tiny"
    for trainer in ("nnUNetTrainerSafeClick", "nnUNetTrainerSafeClickLite", "nnUNetTrainerSafeClickLiteNoE1",
                    "nnUNetTrainerCalSAM", "nnUNetTrainerSAM2FT", "nnUNetTrainerSAMFTImperfect"):
        assert not (results / f"{trainer}__CalibPlans__3d_fullres" / "loco_fold2_seed42").exists()
