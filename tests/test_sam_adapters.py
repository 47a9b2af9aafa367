"""MPA adapters on the tiny SAM: identity at insertion, and one training step of the adapters and the
prompt encoder changes them and nothing else; on LiteMedSAM's TinyViT: one adapter after each of its 10
attention blocks at the stage's width, identity at insertion, gradients into the adapters only."""
import copy

import pytest
import torch

from calibnet.errors import CalibnetError
from calibnet.networks.medsam_u import MedSAMUSegmenter
from calibnet.networks.sam_adapters import (AdaptedBlock, adaptable_blocks, adapter_parameters, insert_adapters,
                                            parse_adapter_blocks)
from calibnet.networks.sam_backbone import SamConfig, SamSliceSegmenter, build_sam, packaged_litemedsam

TINYVIT_WIDTHS = [128] * 2 + [160] * 6 + [320] * 2  # layers[1..3] of LiteMedSAM's TinyViT


def test_adapters_start_as_identity_and_only_they_and_the_prompt_encoder_train():
    segmenter = SamSliceSegmenter(build_sam(SamConfig("tiny")))
    encoder = segmenter.sam.image_encoder
    slices = torch.randn(2, 3, 32, 32)
    before = segmenter.embed(slices)
    insert_adapters(encoder, parse_adapter_blocks("all", len(encoder.blocks)))
    assert all(isinstance(b, AdaptedBlock) for b in encoder.blocks)
    assert torch.equal(segmenter.embed(slices), before)

    segmenter.requires_grad_(False)
    segmenter.train_prompt_encoder = True
    trained = adapter_parameters(segmenter) + list(segmenter.sam.prompt_encoder.parameters())
    for p in trained:
        p.requires_grad_(True)
    snapshot = {k: v.clone() for k, v in segmenter.state_dict().items()}
    optimizer = torch.optim.Adam(trained, lr=1e-2)
    prompts = [{"points": [[10, 12]], "labels": [1], "box": (5, 5, 20, 20)}] * 2
    target = torch.zeros(2, 32, 32)
    target[:, 8:18, 8:18] = 1
    for _ in range(2):  # two steps: the zero-initialised up-projections move first, the down-projections next
        optimizer.zero_grad()
        embeddings = segmenter.sam.image_encoder(segmenter.slices_to_sam_input(slices))
        logits = segmenter.decode(embeddings, prompts, (32, 32))
        torch.nn.functional.binary_cross_entropy_with_logits(logits, target).backward()
        optimizer.step()
    changed = {k for k, v in segmenter.state_dict().items() if not torch.equal(v, snapshot[k])}
    adapter_keys = {k for k in snapshot if ".adapter." in k}
    prompt_keys = {k for k in snapshot if k.startswith("sam.prompt_encoder.") and "pe_layer" not in k}
    assert adapter_keys and adapter_keys <= changed
    assert changed - adapter_keys <= prompt_keys and changed & prompt_keys
    assert not any(k.startswith("sam.mask_decoder.") for k in changed)


@pytest.mark.parametrize("text, expected", [("all", [0, 1, 2, 3]), ("0,2", [0, 2]), ("-1", [3]), ("3,3", [3])])
def test_block_selection(text, expected):
    assert parse_adapter_blocks(text, 4) == expected


@pytest.mark.parametrize("text", ["4", "a", "", "-5"])
def test_bad_block_selection(text):
    with pytest.raises(ValueError, match="adapter-blocks"):
        parse_adapter_blocks(text, 4)


@pytest.fixture(scope="module")
def lite_adapted():
    """LiteMedSAM's encoder before and after adapters on all 10 attention blocks, one 256² slice, and the
    unadapted encoder's output on it (a TinyViT forward takes seconds on CPU: one slice only)."""
    encoder = build_sam(packaged_litemedsam()).image_encoder.eval()
    original = copy.deepcopy(encoder)
    image = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = encoder(image)
    adapters = insert_adapters(encoder, parse_adapter_blocks("all", len(adaptable_blocks(encoder))))
    return original, encoder, adapters, image, before


def test_tinyvit_adapters_follow_exactly_the_attention_blocks_at_their_stage_widths(lite_adapted):
    original, encoder, adapters, _, _ = lite_adapted
    assert [width for _, _, width in adaptable_blocks(original)] == TINYVIT_WIDTHS
    wrapped = [m for m in encoder.modules() if isinstance(m, AdaptedBlock)]
    assert len(wrapped) == len(adapters) == 10
    assert all(type(m.block).__name__ == "TinyViTBlock" for m in wrapped)
    assert [m.block.dim for m in wrapped] == [a.up.out_features for a in adapters] == TINYVIT_WIDTHS
    assert [a.down.out_features for a in adapters] == [w // 4 for w in TINYVIT_WIDTHS]
    assert not any(isinstance(m, AdaptedBlock) for m in encoder.layers[0].modules())  # MBConv stage: none
    assert all(isinstance(b, AdaptedBlock) for layer in encoder.layers[1:] for b in layer.blocks)


def test_tinyvit_adapted_encoder_starts_as_the_pretrained_one(lite_adapted):
    _, encoder, _, image, before = lite_adapted
    with torch.no_grad():
        after = encoder(image)
    assert after.shape == before.shape == (1, 256, 64, 64)
    assert (after - before).abs().max().item() == 0


def test_tinyvit_perturbed_adapter_changes_the_output_and_only_adapters_get_gradients(lite_adapted):
    _, adapted, _, image, before = lite_adapted
    encoder = copy.deepcopy(adapted)
    adapters = [m.adapter for m in encoder.modules() if isinstance(m, AdaptedBlock)]
    encoder.requires_grad_(False)
    for p in adapter_parameters(encoder):
        p.requires_grad_(True)
    with torch.no_grad():
        adapters[4].up.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))  # stage 2, width 160
    output = encoder(image)
    assert (output.detach() - before).abs().max().item() > 1e-3
    output.square().mean().backward()
    adapter_ids = {id(p) for p in adapter_parameters(encoder)}
    assert all(p.grad is None for p in encoder.parameters() if id(p) not in adapter_ids)
    assert all(a.up.weight.grad.abs().sum() > 0 for a in adapters)  # every adapter is on the output's path
    assert adapters[4].down.weight.grad.abs().sum() > 0  # the down-projection learns once its up is non-zero


def test_bad_adapter_blocks_on_tinyvit_say_what_the_encoder_has():
    with pytest.raises(CalibnetError, match=r"--adapter-blocks '10': give 'all' or indices between -10 and 9.*"
                                            r"has 10 blocks that take an adapter"):
        MedSAMUSegmenter(build_sam(packaged_litemedsam()), unit_intensities=True, adapter_blocks="10")
    with pytest.raises(ValueError, match="adapter-blocks '-11'"):
        parse_adapter_blocks("-11", len(adaptable_blocks(build_sam(packaged_litemedsam()).image_encoder)))


def test_medsam_u_on_litemedsam_trains_its_adapters_and_the_prompt_encoder():
    network = MedSAMUSegmenter(build_sam(packaged_litemedsam()), unit_intensities=True, adapter_blocks="all")
    assert len(network.adapters) == 10
    expected = adapter_parameters(network) + list(network.sam.prompt_encoder.parameters())
    assert [id(p) for p in network.trainable_parameters()] == [id(p) for p in expected]
    adapter_keys = {k for k in network.state_dict() if ".adapter." in k}
    assert adapter_keys and all(k.startswith(("sam.image_encoder.layers.1.", "sam.image_encoder.layers.2.",
                                              "sam.image_encoder.layers.3.")) for k in adapter_keys)
