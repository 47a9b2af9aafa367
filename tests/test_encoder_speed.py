"""The frozen encoder's inference copy (calibnet.networks.fast_encoder): the embeddings of the plain encoder."""
import numpy as np
import pytest
import torch

from calibnet.networks.sam_backbone import SamConfig, SamSliceSegmenter, build_sam, resolve_sam_config


def relative_error(embeddings: torch.Tensor, reference: torch.Tensor) -> float:
    return ((embeddings - reference).abs().max() / reference.abs().max()).item()


def test_litemedsam_embeddings_match_the_plain_encoder_batched_or_not():
    config, _ = resolve_sam_config(None, None)
    network = SamSliceSegmenter(build_sam(config), unit_intensities=True, image_channel=0)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:40, :52]
    images = [rng.normal(0, 0.3, yy.shape) + 2.0 * (((yy - cy) / 9) ** 2 + ((xx - 26) / 12) ** 2 < 1)
              for cy in (15, 24)]
    slices = torch.from_numpy(np.stack([np.stack([image] * 3) for image in images])).float()
    inputs = network.slices_to_sam_input(slices)
    with torch.no_grad():
        reference = network.sam.image_encoder(inputs)  # the float32 path before: BatchNorm apart, NCHW
    together = network.embed(slices)
    alone = torch.cat([network.embed(slices[i:i + 1]) for i in range(len(slices))])
    assert together.shape == reference.shape == (2, 256, 64, 64)
    assert relative_error(together, reference) < 1e-3  # the store's tolerance; measured about 1e-6
    assert relative_error(alone, together) < 1e-5  # a slice's embedding does not depend on its batch


def test_the_inference_copy_follows_weights_loaded_later_and_stays_out_of_the_state_dict():
    network = SamSliceSegmenter(build_sam(SamConfig("tiny")))
    inputs = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    keys = list(network.state_dict())
    with torch.no_grad():
        before = network.encode(inputs)
        state = {k: v + 0.01 * torch.randn_like(v) if k.startswith("sam.image_encoder.") and v.is_floating_point()
                 else v for k, v in network.state_dict().items()}
        network.load_state_dict(state)  # a checkpoint loaded after the first encoding
        after = network.encode(inputs)
        plain = network.sam.image_encoder(inputs)
    assert list(network.state_dict()) == keys  # the copy is neither a submodule nor in the store's digest
    assert not torch.allclose(after, before)
    assert relative_error(after, plain) < 1e-5


def test_with_gradients_the_encoder_itself_runs():
    network = SamSliceSegmenter(build_sam(SamConfig("tiny")))
    network.image_encoder.requires_grad_(True)
    inputs = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    network.encode(inputs).sum().backward()
    assert next(network.image_encoder.parameters()).grad is not None
    assert "_inference_encoder" not in network.__dict__
