"""Calibration-aware loss terms as pure functions of tensors (trainers only wire them in).

- FIP, the feature Fisher information penalty (CalSAM, Algorithm 1): ½ · mean over samples of the squared
  L2 norm of ∂L_seg/∂z, computed with ``create_graph=True`` so that it can itself be backpropagated.
- CMP, the confidence misalignment penalty (CalSAM, Eq. 4): mean over voxels of σ((ℓ_CE − τ)/γ).
- Focal loss (Lin et al. 2017) and the Dice++ loss (Yeung et al. 2023), the calibration baselines.

Shapes follow nnU-Net: logits (B, C, *spatial); label maps (B, 1, *spatial) with class indices, or, for
region-based datasets, (B, R, *spatial) binary region masks with sigmoid outputs.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

DEFAULT_LAMBDA_FIP = 0.3
DEFAULT_LAMBDA_CMP = 0.5
DEFAULT_CMP_TAU = math.log(2.0)  # a voxel whose true class has p < 0.5 is penalised
DEFAULT_CMP_GAMMA = 0.1
DEFAULT_FOCAL_GAMMA = 2.0
DEFAULT_DICEPP_GAMMA = 2.0


def fisher_information_penalty(seg_loss: torch.Tensor, features: Sequence[torch.Tensor]) -> torch.Tensor:
    """FIP = ½ · mean_b ‖∂ seg_loss / ∂z_b‖², z = all ``features`` of sample b together.

    ``features`` must be part of the graph of ``seg_loss`` (non-leaf tensors for nnU-Net's skips, or
    detached copies with ``requires_grad`` for a frozen encoder). The gradient is taken with
    ``create_graph=True``, so the returned penalty is differentiable with respect to the parameters.
    """
    features = list(features)
    grads = torch.autograd.grad(seg_loss, features, create_graph=True, allow_unused=True)
    batch = features[0].shape[0]
    squared = seg_loss.new_zeros(batch)
    for grad in grads:
        if grad is not None:
            squared = squared + grad.pow(2).reshape(batch, -1).sum(1)
    return 0.5 * squared.mean()


def voxel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, regions: bool = False) -> torch.Tensor:
    """Per-voxel cross-entropy ℓ_CE: softmax CE (B, *spatial) for label maps; for region masks the binary
    CE of each region (B, R, *spatial)."""
    if regions:
        return F.binary_cross_entropy_with_logits(logits, target.float(), reduction="none")
    return F.cross_entropy(logits, target[:, 0].long(), reduction="none")


def confidence_misalignment_penalty(logits: torch.Tensor, target: torch.Tensor, tau: float = DEFAULT_CMP_TAU,
                                    gamma: float = DEFAULT_CMP_GAMMA, regions: bool = False) -> torch.Tensor:
    """CMP = mean over voxels of sigmoid((ℓ_CE − τ) / γ): close to 1 where the true class is predicted with
    probability below exp(−τ), close to 0 where it is predicted confidently."""
    return torch.sigmoid((voxel_cross_entropy(logits, target, regions) - tau) / gamma).mean()


def binary_soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """1 − soft Dice of sigmoid(logits) against a binary target, over all elements."""
    probabilities = torch.sigmoid(logits)
    return 1 - (2 * (probabilities * target).sum() + smooth) / (probabilities.sum() + target.sum() + smooth)


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = DEFAULT_FOCAL_GAMMA,
               regions: bool = False) -> torch.Tensor:
    """Mean of −(1 − p_t)^γ · log p_t over voxels (and regions); γ = 0 gives cross-entropy."""
    ce = voxel_cross_entropy(logits, target, regions)
    p_true = torch.exp(-ce)
    return ((1 - p_true).pow(gamma) * ce).mean()


def dice_plus_plus_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = DEFAULT_DICEPP_GAMMA,
                        regions: bool = False, include_background: bool = False, smooth: float = 1e-5) -> torch.Tensor:
    """1 − mean over classes of DSC++ (Yeung et al. 2023), computed over the whole batch:

        DSC++ = (2·TP + s) / (2·TP + Σ (p·(1−y))^γ + Σ ((1−p)·y)^γ + s)

    Raising each voxel's false-positive and false-negative contribution to γ > 1 penalises confident
    errors more than hesitant ones; γ = 1 gives the soft Dice loss.
    """
    if regions:
        probabilities, onehot = torch.sigmoid(logits), target.float()
    else:
        probabilities = torch.softmax(logits, 1)
        onehot = torch.zeros_like(probabilities).scatter_(1, target.long(), 1.0)
        if not include_background:
            probabilities, onehot = probabilities[:, 1:], onehot[:, 1:]
    axes = [0] + list(range(2, logits.ndim))
    tp = (probabilities * onehot).sum(axes)
    fp = (probabilities * (1 - onehot)).pow(gamma).sum(axes)
    fn = ((1 - probabilities) * onehot).pow(gamma).sum(axes)
    dsc = (2 * tp + smooth) / (2 * tp + fp + fn + smooth)
    return 1 - dsc.mean()
