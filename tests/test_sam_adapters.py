"""MPA adapters on the tiny SAM: identity at insertion, and one training step of the adapters and the
prompt encoder changes them and nothing else."""
import pytest
import torch

from calibnet.networks.sam_adapters import (AdaptedBlock, adapter_parameters, insert_adapters,
                                            parse_adapter_blocks)
from calibnet.networks.sam_backbone import SamConfig, SamSliceSegmenter, build_sam


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
