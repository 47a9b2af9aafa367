"""Batched SAM decoding (issue 19 item 2): every slice of a batch (and every box of a prompt set) decoded in one
prompt-encoder + mask-decoder call gives the logits, the decoder's gradients and CalSAM's per-slice FIP of
decoding each slice on its own, with the package's modules called as for one image (the reference below)."""
from collections import Counter
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from calibnet.losses import binary_soft_dice_loss, fisher_information_penalty
from calibnet.networks.safeclick_sam import SafeClickSamSegmenter
from calibnet.networks.sam_backbone import EMPTY_LOGIT, SamConfig, SamSliceSegmenter, build_sam, resolve_sam_config
from calibnet.prompt_quality import SlicePrompts

SHAPE = (24, 30)
POINTS = [{"points": [[3, 4]], "labels": [1]}, {"points": [[12, 20]], "labels": [1]},
          {"points": [[8, 9]], "labels": [1]}, {"points": [[20, 2]], "labels": [1]}]
BOXES = [{"box": (2, 3, 20, 22)}, {"box": (4, 4, 11, 16)}, {"box": (0, 5, 23, 29)}, {"box": (6, 1, 9, 12)}]
MIXED = [POINTS[0], BOXES[0], {"points": [[5, 6], [10, 1]], "labels": [1, 0]}, None, POINTS[1],
         {"points": [[1, 2]], "labels": [1], "box": (1, 1, 9, 9)}, BOXES[1], POINTS[2]]


def one_by_one(network, embeddings, prompts, shape):
    """The loop: each slice's prompt encoded and decoded on its own, one image embedding per decoder call."""
    outputs = []
    for embedding, prompt in zip(embeddings, prompts):
        if prompt is None:
            outputs.append(torch.full(shape, EMPTY_LOGIT))
            continue
        points, boxes = network.sam_prompts(prompt, shape, torch.float32, "cpu")
        sparse, dense = network.prompt_encoder(points=points, boxes=boxes, masks=None)
        low_res, _ = network.mask_decoder(image_embeddings=embedding[None],
                                          image_pe=network.prompt_encoder.get_dense_pe(),
                                          sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                          multimask_output=False)
        outputs.append(network.to_slice_shape(low_res, shape)[0, 0])
    return torch.stack(outputs)


@contextmanager
def decoder_calls(network):
    """A list that records the number of prompts of each mask-decoder call inside the block."""
    calls = []
    handle = network.mask_decoder.register_forward_hook(
        lambda _m, _args, kwargs, _out: calls.append(kwargs["sparse_prompt_embeddings"].shape[0]), with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


def slice_losses(logits, targets):
    return torch.stack([binary_soft_dice_loss(logit.flatten(), target.flatten())
                        for logit, target in zip(logits, targets)])


def per_slice_fip(network, embeddings, prompts, targets, shape):
    """½·mean_b ‖∂L_b/∂z_b‖², each g_b taken from slice b decoded alone (CalSAM Eq. 3 by its definition)."""
    squared = []
    for b, prompt in enumerate(prompts):
        z_b = embeddings[b:b + 1].detach().clone().requires_grad_(True)
        loss = slice_losses(one_by_one(network, z_b, [prompt], shape), targets[b:b + 1])[0]
        (grad,) = torch.autograd.grad(loss, z_b, create_graph=True)
        squared.append(grad.pow(2).sum())
    return 0.5 * torch.stack(squared).mean()


def parameter_grads(network, loss):
    parameters = network.decoder_parameters()
    return [g if g is not None else torch.zeros_like(p)
            for g, p in zip(torch.autograd.grad(loss, parameters, retain_graph=True, allow_unused=True), parameters)]


def logit_difference(logits, reference):
    """max |Δ| / max(1, |reference logit|): absolute where |logit| ≤ 1, relative beyond. LiteMedSAM's logits
    reach ±30, where float32's spacing is 2e-6 and its loop alone, run with one thread instead of two, moves
    them by 2e-5: an absolute 1e-5 there asks for the summation order of the loop's own matrix products."""
    return float(((logits - reference).abs() / reference.abs().clamp_min(1)).max())


def relative_difference(grads, reference):
    """max |Δ| over all gradient entries, relative to the largest reference entry (FIP's parameter gradients
    are ~1e-7 on the tiny SAM: an absolute 1e-5 would hold for any two such gradients)."""
    scale = max(float(g.abs().max()) for g in reference)
    assert scale > 0
    return max(float((a - b).abs().max()) for a, b in zip(grads, reference)) / scale


@pytest.fixture(scope="module")
def tiny():
    network = SamSliceSegmenter(build_sam(SamConfig("tiny")))
    torch.manual_seed(1)
    return network, torch.randn(len(MIXED), 64, 8, 8)


def assert_batched_losses_and_fip_match_the_loop(network, embeddings, prompts, targets, gradient_tolerance=1e-5):
    """Per-slice losses, FIP and the decoder's gradients of both through the batched decode equal the loop's
    (gradients relative to their largest entry: LiteMedSAM's double backward sums in another order in float32)."""
    z = embeddings.clone().requires_grad_(True)
    losses = slice_losses(network.decode(z, prompts, SHAPE), targets)
    fip = fisher_information_penalty(losses, [z])
    reference_losses = slice_losses(one_by_one(network, embeddings, prompts, SHAPE), targets)
    reference_fip = per_slice_fip(network, embeddings, prompts, targets, SHAPE)
    assert logit_difference(losses.detach(), reference_losses.detach()) <= 1e-5
    assert abs(fip.item() - reference_fip.item()) <= 1e-5 * reference_fip.item()
    assert relative_difference(parameter_grads(network, losses.mean()),
                               parameter_grads(network, reference_losses.mean())) <= gradient_tolerance
    assert relative_difference(parameter_grads(network, fip), parameter_grads(network, reference_fip)) \
        <= gradient_tolerance


@pytest.mark.parametrize("prompts", [POINTS, BOXES, MIXED], ids=["points", "boxes", "mixed"])
def test_tiny_sam_decodes_a_batch_in_one_call_per_prompt_shape_as_the_loop_does(tiny, prompts):
    network, embeddings = tiny
    embeddings = embeddings[:len(prompts)]
    with torch.no_grad(), decoder_calls(network) as calls:
        batched = network.decode(embeddings, prompts, SHAPE)
    with torch.no_grad():
        expected = one_by_one(network, embeddings, prompts, SHAPE)
    shapes = Counter((len(p.get("points", ())), "box" in p) for p in prompts if p is not None)
    assert sorted(calls) == sorted(shapes.values())  # one call per prompt shape, all its slices together
    assert logit_difference(batched, expected) <= 1e-5


def test_chunks_and_the_batched_stock_decoder_pairing():
    """decode_chunk splits a group without changing a logit; the stock segment-anything decoder cannot take B
    embeddings with B prompts (it repeats each embedding B times), which is why decode_low_res pairs them."""
    network = SamSliceSegmenter(build_sam(SamConfig("tiny")))
    embeddings = torch.randn(5, 64, 8, 8)
    with torch.no_grad():
        whole = network.decode(embeddings, POINTS + POINTS[:1], SHAPE)
        network.decode_chunk = 2
        chunked = network.decode(embeddings, POINTS + POINTS[:1], SHAPE)
        sparse, dense = network.prompt_encoder(points=(torch.rand(5, 1, 2) * 64, torch.ones(5, 1)), boxes=None,
                                               masks=None)
        with pytest.raises(RuntimeError, match="size of tensor"):
            network.mask_decoder(image_embeddings=embeddings, image_pe=network.prompt_encoder.get_dense_pe(),
                                 sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                 multimask_output=False)
    assert logit_difference(whole, chunked) <= 1e-5


def test_tiny_sam_decoder_gradients_and_fip_through_the_batch_equal_the_loops(tiny):
    """Loss = mean per-slice Dice + FIP (per-slice gradients w.r.t. each slice's own embedding): its value and
    the decoder's parameter gradients are those of the loop, for mixed prompt shapes."""
    network, embeddings = tiny
    prompts = [p for p in MIXED if p is not None]
    embeddings = embeddings[:len(prompts)]
    targets = (torch.rand(len(prompts), *SHAPE, generator=torch.Generator().manual_seed(0)) > 0.6).float()
    assert_batched_losses_and_fip_match_the_loop(network, embeddings, prompts, targets)


def test_calsam_loss_terms_decode_slices_of_two_sizes_batched_with_per_slice_fip():
    """The trainer's own objective (segmentation loss, FIP, CMP) on slices of two sizes (two cases), each size
    decoded in one call, equals the per-slice definition: FIP from every slice decoded alone."""
    from calibnet.trainers.nnUNetTrainerSAM import nnUNetTrainerCalSAM

    network = SamSliceSegmenter(build_sam(SamConfig("tiny")))
    rng = np.random.default_rng(0)
    volumes = {}
    for case_id, shape in (("a", (20, 26)), ("b", (32, 24))):
        foreground = np.zeros((3, *shape), bool)
        for z in range(3):
            top, left = rng.integers(2, 8, size=2)
            foreground[z, top:top + 9 + z, left:left + 7] = True
        volumes[case_id] = (torch.zeros(1, 3, *shape), foreground)
    keys = [("a", 0), ("b", 1), ("a", 2), ("b", 0), ("a", 1)]
    embeddings = torch.randn(len(keys), 64, 8, 8, generator=torch.Generator().manual_seed(2))

    class Fixed(nnUNetTrainerCalSAM):
        def embeddings(self, wanted):
            return embeddings[[keys.index(k) for k in wanted]]

    trainer = object.__new__(Fixed)  # no nnU-Net set-up: only the objective is exercised
    trainer.network, trainer.volumes, trainer.device, trainer.seed, trainer.current_epoch = \
        network, volumes, torch.device("cpu"), 0, 0
    trainer.fip_estimator = "exact"
    with decoder_calls(network) as calls:
        terms = trainer.loss_terms(keys)
    assert calls == [3, 2]  # one decoder call per slice size (every prompt: foreground + background point)

    prompts = trainer.slice_prompts(keys)
    reference_losses, squared = [], []
    for b, (case_id, z) in enumerate(keys):
        z_b = embeddings[b:b + 1].clone().requires_grad_(True)
        logits = one_by_one(network, z_b, [prompts[b]], volumes[case_id][1][z].shape)[0].flatten()
        loss = trainer.slice_loss(logits, torch.from_numpy(volumes[case_id][1][z].astype(np.float32)).flatten())
        (grad,) = torch.autograd.grad(loss, z_b, create_graph=True)
        reference_losses.append(loss)
        squared.append(grad.pow(2).sum())
    reference_fip = 0.5 * torch.stack(squared).mean()
    assert abs(terms["segmentation loss"].item() - torch.stack(reference_losses).mean().item()) <= 1e-6
    assert abs(terms["FIP"].item() - reference_fip.item()) <= 1e-5 * reference_fip.item()
    assert relative_difference(parameter_grads(network, terms["FIP"]), parameter_grads(network, reference_fip)) <= 1e-5

    # --fip-estimator amortised, on a step that reuses the last FIP gradient: no double backward (the embeddings
    # need no gradient, the decoder is called once per size), the kept penalty logged as a constant
    trainer.fip_estimator, trainer._fip_value = "amortised", torch.tensor(0.25)
    trainer.fip_due = lambda: False
    with decoder_calls(network) as calls:
        reused = trainer.loss_terms(keys)
    assert calls == [3, 2] and reused["FIP"].item() == 0.25 and not reused["FIP"].requires_grad
    assert reused["segmentation loss"].item() == pytest.approx(terms["segmentation loss"].item(), abs=1e-6)


def test_prompt_sets_decode_every_box_of_every_slice_together():
    network = SamSliceSegmenter(build_sam(SamConfig("tiny")))
    embeddings = torch.randn(3, 64, 8, 8, generator=torch.Generator().manual_seed(3))
    sets = [SlicePrompts([(10.0, 11.0)], [1], [(4.0, 4.0, 15.0, 15.0), (6.5, 5.0, 18.0, 20.0)]), None,
            SlicePrompts([(3.0, 4.0)], [1], [(1.0, 2.0, 9.0, 12.0)])]
    with torch.no_grad(), decoder_calls(network) as calls:
        logits = network.decode_prompt_sets([embeddings[0], None, embeddings[2]], sets, SHAPE)
    assert calls == [3]
    for z in (0, 2):
        variants = [{"points": [list(p) for p in sets[z].points], "labels": [1], "box": box} for box in sets[z].boxes]
        with torch.no_grad():
            single = one_by_one(network, embeddings[z:z + 1].expand(len(variants), -1, -1, -1), variants, SHAPE)
        expected = torch.logit(torch.sigmoid(single).mean(0), eps=1e-7)
        assert logit_difference(logits[z], expected) <= 1e-5
    assert torch.all(logits[1] == EMPTY_LOGIT)


def test_safeclick_plugin_decodes_a_batch_as_one_slice_at_a_time():
    """SafeClick's experts read each slice's own x_f and x_i: with a non-zero fusion (not the identity it starts
    as) the batch still gives every slice its loop logits."""
    network = SafeClickSamSegmenter(build_sam(SamConfig("tiny")))
    torch.nn.init.normal_(network.plugin.fusion_conv.weight, std=0.5)
    embeddings = network.embed(torch.randn(4, 3, *SHAPE, generator=torch.Generator().manual_seed(4)))
    prompts = [POINTS[0], BOXES[0], POINTS[1], BOXES[1]]
    with torch.no_grad():
        batched = network.decode(embeddings, prompts, SHAPE)
        network.decode_chunk = 1
        looped = network.decode(embeddings, prompts, SHAPE)
        network.plugin.fusion_conv.weight.zero_()
        plain = network.decode(embeddings, prompts, SHAPE)
    assert logit_difference(batched, looped) <= 1e-5
    assert (batched - plain).abs().max() > 1e-3  # the plug-in changes the logits, so the pairing is tested


# --- the packaged LiteMedSAM (its copy of the decoder skips the repeat when the counts match) -----------------

@pytest.fixture(scope="module")
def lite():
    """LiteMedSAM and four distinct slice embeddings derived from one encoder forward (the encoder costs ~2 s
    per slice on 2 cores; the decoder is what is tested)."""
    config = resolve_sam_config(None, None)[0]
    network = SamSliceSegmenter(build_sam(config), unit_intensities=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:SHAPE[0], :SHAPE[1]]
    image = rng.normal(0, 0.3, SHAPE) + 2.0 * (((yy - 12) ** 2 / 49 + (xx - 15) ** 2 / 64) < 1)
    with torch.no_grad():
        embedding = network.embed(torch.from_numpy(np.stack([image] * 3)[None]).float())
    embeddings = torch.cat([embedding, embedding.flip(-1), embedding.flip(-2), embedding.roll(9, -1)])
    return network, embeddings


def test_litemedsam_batched_logits_equal_the_loop(lite):
    network, embeddings = lite
    prompts = [POINTS[0], BOXES[0], POINTS[1], BOXES[1], MIXED[5], POINTS[2]]
    chosen = embeddings[[0, 1, 2, 3, 0, 1]]
    with torch.no_grad():
        batched = network.decode(chosen, prompts, SHAPE)
        expected = one_by_one(network, chosen, prompts, SHAPE)
    assert logit_difference(batched, expected) <= 1e-5


@pytest.mark.slow
def test_litemedsam_decoder_gradients_and_fip_through_the_batch_equal_the_loops(lite):
    network, embeddings = lite
    """Two slices with point prompts, decoded in one call (mixed shapes are checked on the logits above; each
    slice's double backward through LiteMedSAM's decoder costs seconds on 2 cores)."""
    prompts = [POINTS[0], POINTS[1]]
    embeddings = embeddings[:2]
    targets = torch.zeros(2, *SHAPE)
    targets[:, 6:18, 8:22] = 1.0
    assert_batched_losses_and_fip_match_the_loop(network, embeddings, prompts, targets, gradient_tolerance=1e-4)
