"""The loss terms against hand-computed values and independent computations."""
import math

import pytest
import torch

from calibnet.trainers.losses import (confidence_misalignment_penalty, dice_plus_plus_loss,
                                      fisher_information_penalty, focal_loss)

torch.manual_seed(0)


class TinyDecoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(3, 2, 1)

    def forward(self, z):
        return self.conv(torch.tanh(z))


def _seg_loss(decoder, z, target):
    return torch.nn.functional.cross_entropy(decoder(z), target)


def test_fip_is_half_the_mean_squared_gradient_norm_checked_by_finite_differences():
    decoder = TinyDecoder().double()
    z = torch.randn(2, 3, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 2, (2, 2, 2, 2))
    fip = fisher_information_penalty(_seg_loss(decoder, z, target), [z])
    # central differences of the loss with respect to every element of z
    eps, grad = 1e-6, torch.zeros_like(z)
    with torch.no_grad():
        for index in range(z.numel()):
            step = torch.zeros(z.numel(), dtype=torch.float64)
            step[index] = eps
            step = step.view_as(z)
            grad.view(-1)[index] = (_seg_loss(decoder, z + step, target) - _seg_loss(decoder, z - step, target)) / (2 * eps)
    expected = 0.5 * grad.pow(2).reshape(2, -1).sum(1).mean()
    assert fip.item() == pytest.approx(expected.item(), rel=1e-6)


def test_fip_gradient_reaches_the_parameters_through_double_backward():
    decoder = TinyDecoder()
    z = torch.randn(2, 3, 2, 2, 2).detach().requires_grad_(True)
    fip = fisher_information_penalty(_seg_loss(decoder, z, torch.randint(0, 2, (2, 2, 2, 2))), [z])
    fip.backward()
    assert decoder.conv.weight.grad is not None and decoder.conv.weight.grad.abs().sum() > 0


def test_fip_over_several_feature_maps_adds_their_squared_norms():
    decoder = TinyDecoder()
    z1 = torch.randn(2, 3, 2, 2, 2, requires_grad=True)
    z2 = torch.randn(2, 3, 2, 2, 2, requires_grad=True)
    target = torch.randint(0, 2, (2, 2, 2, 2))
    loss = _seg_loss(decoder, z1, target) + 2 * _seg_loss(decoder, z2, target)
    g1, g2 = torch.autograd.grad(loss, [z1, z2], retain_graph=True)
    expected = 0.5 * (g1.pow(2).reshape(2, -1).sum(1) + g2.pow(2).reshape(2, -1).sum(1)).mean()
    assert fisher_information_penalty(loss, [z1, z2]).item() == pytest.approx(expected.item(), rel=1e-5)


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
