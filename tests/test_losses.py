"""The loss terms against hand-computed values and independent computations."""
import math

import pytest
import torch

from calibnet.losses import (FipEstimator, confidence_misalignment_penalty, dice_plus_plus_loss,
                                      fisher_information_penalty, focal_loss, full_precision)

torch.manual_seed(0)


class TinyDecoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(3, 2, 1)

    def forward(self, z):
        return self.conv(torch.tanh(z))


def _seg_loss(decoder, z, target):
    return torch.nn.functional.cross_entropy(decoder(z), target)


def _sample_losses(decoder, z, target):
    """Each sample's own loss, shape (B,): the mean cross-entropy over its voxels."""
    return torch.nn.functional.cross_entropy(decoder(z), target, reduction="none").flatten(1).mean(1)


def test_fip_is_half_the_mean_of_each_samples_squared_gradient_norm_by_finite_differences():
    decoder = TinyDecoder().double()
    z = torch.randn(3, 3, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 2, (3, 2, 2, 2))
    fip = fisher_information_penalty(_sample_losses(decoder, z, target), [z])
    # central differences of sample b's own loss with respect to every element of that sample's z_b
    eps, squared_norms = 1e-6, []
    with torch.no_grad():
        for b in range(3):
            z_b, grad = z[b:b + 1].detach(), torch.zeros(z[b].numel(), dtype=torch.float64)
            for index in range(z_b.numel()):
                step = torch.zeros(z_b.numel(), dtype=torch.float64)
                step[index] = eps
                step = step.view_as(z_b)
                grad[index] = (_seg_loss(decoder, z_b + step, target[b:b + 1])
                               - _seg_loss(decoder, z_b - step, target[b:b + 1])) / (2 * eps)
            squared_norms.append(grad.pow(2).sum().item())
    assert fip.item() == pytest.approx(0.5 * sum(squared_norms) / 3, rel=1e-6)


def test_fip_of_a_batch_of_identical_samples_is_that_of_one_sample():
    decoder = TinyDecoder()
    z1 = torch.randn(1, 3, 4, 4, 4)
    target1 = torch.randint(0, 2, (1, 4, 4, 4))
    z = z1.clone().requires_grad_(True)
    one = fisher_information_penalty(_sample_losses(decoder, z, target1), [z])
    for batch in (2, 5):
        zb = z1.repeat(batch, 1, 1, 1, 1).requires_grad_(True)
        fip = fisher_information_penalty(_sample_losses(decoder, zb, target1.repeat(batch, 1, 1, 1)), [zb])
        assert fip.item() == pytest.approx(one.item(), rel=1e-5)
    assert one.item() > 0


def test_fip_takes_one_loss_per_sample():
    decoder = TinyDecoder()
    z = torch.randn(2, 3, 2, 2, 2, requires_grad=True)
    with pytest.raises(ValueError, match=r"one loss per sample, shape \(2,\)"):
        fisher_information_penalty(_seg_loss(decoder, z, torch.randint(0, 2, (2, 2, 2, 2))), [z])


def test_fip_gradient_reaches_the_parameters_through_double_backward():
    decoder = TinyDecoder()
    z = torch.randn(2, 3, 2, 2, 2).detach().requires_grad_(True)
    fip = fisher_information_penalty(_sample_losses(decoder, z, torch.randint(0, 2, (2, 2, 2, 2))), [z])
    fip.backward()
    assert decoder.conv.weight.grad is not None and decoder.conv.weight.grad.abs().sum() > 0


def test_fip_over_several_feature_maps_adds_their_squared_norms():
    decoder = TinyDecoder()
    z1 = torch.randn(2, 3, 2, 2, 2, requires_grad=True)
    z2 = torch.randn(2, 3, 2, 2, 2, requires_grad=True)
    target = torch.randint(0, 2, (2, 2, 2, 2))
    losses = _sample_losses(decoder, z1, target) + 2 * _sample_losses(decoder, z2, target)
    expected = 0
    for b in range(2):
        g1, g2 = torch.autograd.grad(losses[b], [z1, z2], retain_graph=True)
        expected += 0.5 * (g1[b].pow(2).sum() + g2[b].pow(2).sum()) / 2
    assert fisher_information_penalty(losses, [z1, z2]).item() == pytest.approx(expected.item(), rel=1e-5)


class VoxelDecoder(torch.nn.Module):
    """Cheap per-voxel decoder for large volumes."""

    def __init__(self):
        super().__init__()
        self.first, self.second = torch.nn.Conv3d(2, 4, 1), torch.nn.Conv3d(4, 2, 1)

    def forward(self, z):
        return self.second(torch.nn.functional.leaky_relu(self.first(z)))


@pytest.mark.parametrize("dtype, side", [(torch.bfloat16, 16), (torch.float16, 96)])
def test_fip_path_is_float32_under_autocast(dtype, side):
    """As the trainers run it: float32 features, decoder and per-sample losses under full_precision(), inside
    a mixed-precision region. On 96³ voxels the inner gradient (≈ 1/N per voxel) is below float16's normal
    range: the same path left under float16 autocast is off by about 5 %."""
    torch.manual_seed(1)
    decoder = VoxelDecoder()
    z = torch.randn(2, 2, side, side, side, requires_grad=True)
    target = torch.randint(0, 2, (2, side, side, side))
    reference = fisher_information_penalty(_sample_losses(decoder, z, target), [z]).item()
    with torch.autocast("cpu", dtype=dtype):
        with full_precision():
            fip = fisher_information_penalty(_sample_losses(decoder, z, target), [z])
        left_in_autocast = fisher_information_penalty(_sample_losses(decoder, z, target), [z]).item()
    assert fip.dtype == torch.float32 and fip.item() == pytest.approx(reference, rel=1e-2)
    if dtype == torch.float16:
        assert abs(left_in_autocast / reference - 1) > 1e-2  # what the float32 path avoids


def test_cmp_matches_the_formula_on_hand_made_logits():
    # two voxels, two classes: the first predicts the true class with p = 0.8, the second with p = 0.3
    logits = torch.tensor([[[math.log(0.8), math.log(0.3)], [math.log(0.2), math.log(0.7)]]])  # (1, 2, 2)
    target = torch.tensor([[[0, 0]]])  # (1, 1, 2)
    tau, gamma = math.log(2), 0.1
    sigmoid = lambda v: 1 / (1 + math.exp(-v))
    expected = (sigmoid((-math.log(0.8) - tau) / gamma) + sigmoid((-math.log(0.3) - tau) / gamma)) / 2
    assert confidence_misalignment_penalty(logits, target, tau, gamma).item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx((0.0090 + 0.9939) / 2, abs=1e-3)


def test_cmp_for_regions_uses_the_binary_cross_entropy_of_each_region():
    logits = torch.tensor([[[0.0], [2.0]]])  # (1, 2 regions, 1 voxel)
    target = torch.tensor([[[1.0], [0.0]]])
    ce = [math.log(2), math.log(1 + math.exp(2))]
    expected = sum(1 / (1 + math.exp(-(c - math.log(2)) / 0.1)) for c in ce) / 2
    assert confidence_misalignment_penalty(logits, target, regions=True).item() == pytest.approx(expected, rel=1e-6)


def test_focal_loss_hand_computed_and_reduces_to_cross_entropy():
    logits = torch.tensor([[[math.log(0.9)], [math.log(0.1)]]])  # p(class 0) = 0.9
    target = torch.tensor([[[0]]])
    expected = (1 - 0.9) ** 2 * -math.log(0.9)
    assert focal_loss(logits, target, gamma=2).item() == pytest.approx(expected, rel=1e-6)
    assert focal_loss(logits, target, gamma=0).item() == pytest.approx(-math.log(0.9), rel=1e-6)


def test_dice_plus_plus_hand_computed():
    # foreground probabilities 0.9, 0.6, 0.2 against labels 1, 0, 1 (background excluded)
    p = torch.tensor([0.9, 0.6, 0.2])
    logits = torch.log(torch.stack([1 - p, p]))[None]  # (1, 2, 3)
    target = torch.tensor([[[1, 0, 1]]])
    tp, fp, fn = 0.9 + 0.2, 0.6 ** 2, 0.1 ** 2 + 0.8 ** 2
    expected = 1 - (2 * tp + 1e-5) / (2 * tp + fp + fn + 1e-5)
    assert dice_plus_plus_loss(logits, target, gamma=2).item() == pytest.approx(expected, rel=1e-5)
    soft_dice = 1 - (2 * tp + 1e-5) / (2 * tp + 0.6 + 0.1 + 0.8 + 1e-5)
    assert dice_plus_plus_loss(logits, target, gamma=1).item() == pytest.approx(soft_dice, rel=1e-5)


def test_fip_estimators_say_which_steps_take_fip_afresh():
    exact, amortised = FipEstimator("exact"), FipEstimator("amortised", every=3)
    assert all(exact.fresh(step, have_gradient=True) for step in range(7))
    assert [amortised.fresh(step, have_gradient=True) for step in range(7)] == [True, False, False, True, False,
                                                                                False, True]
    assert amortised.fresh(5, have_gradient=False)  # nothing kept yet (a resumed process): afresh


def test_fip_estimator_refuses_unknown_names_and_intervals():
    with pytest.raises(ValueError, match="choose exact, amortised"):
        FipEstimator("hutchinson")
    for every in (0, 2.5):
        with pytest.raises(ValueError, match="whole number of steps"):
            FipEstimator("amortised", every=every)
