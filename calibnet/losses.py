"""Calibration-aware loss terms as pure functions of tensors (trainers only wire them in).

- FIP, the feature Fisher information penalty (CalSAM, Eq. 3 and Algorithm 1): ½ · mean over samples b of
  the squared L2 norm of ∂L_seg(x_b)/∂z_b, the gradient of each sample's own loss, computed in float32 with
  ``create_graph=True`` so that it can itself be backpropagated.
- CMP, the confidence misalignment penalty (CalSAM, Eq. 4): mean over voxels of σ((ℓ_CE − τ)/γ).
- Focal loss (Lin et al. 2017) and the Dice++ loss (Yeung et al. 2023), the calibration baselines.

Shapes follow nnU-Net: logits (B, C, *spatial); label maps (B, 1, *spatial) with class indices, or, for
region-based datasets, (B, R, *spatial) binary region masks with sigmoid outputs.
"""
from __future__ import annotations

import math
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

DEFAULT_LAMBDA_FIP = 0.3
DEFAULT_FIP_ESTIMATOR = "exact"
DEFAULT_LAMBDA_CMP = 0.5
DEFAULT_CMP_TAU = math.log(2.0)  # a voxel whose true class has p < 0.5 is penalised
DEFAULT_CMP_GAMMA = 0.1
DEFAULT_FOCAL_GAMMA = 2.0
DEFAULT_DICEPP_GAMMA = 2.0


@contextmanager
def full_precision():
    """Autocast off (CPU and CUDA) inside the block: what is computed there runs in the dtype of its inputs.

    The FIP path (decoder forward from float32 features, per-sample losses, the gradient) runs here, so that
    it is float32 even inside a mixed-precision training step: the inner gradient is about 1/N_voxels per
    voxel and its square far smaller, which float16 flushes to zero and bfloat16 rounds to 3 digits.
    """
    with ExitStack() as stack:
        stack.enter_context(torch.autocast("cpu", enabled=False))
        if torch.cuda.is_available():
            stack.enter_context(torch.autocast("cuda", enabled=False))
        yield


def fisher_information_penalty(sample_losses: torch.Tensor, features: Sequence[torch.Tensor],
                               create_graph: bool = True) -> torch.Tensor:
    """FIP = ½ · mean_b ‖∂L_b / ∂z_b‖² (CalSAM Eq. 3), z_b = all ``features`` of sample b together.

    ``sample_losses`` has shape (B,): L_b is sample b's *own* segmentation loss, not the batch mean (whose
    gradient is each L_b's divided by B, which would scale the penalty by 1/B²) nor a loss that couples the
    samples (a Dice over the whole batch). When the samples are independent — z_b influences L_b only, as
    with a decoder applied slice by slice or a network with per-sample (instance) normalisation — the
    gradient of Σ_b L_b with respect to z has g_b = ∂L_b/∂z_b in its row b, so one backward pass gives
    every sample's gradient; that is how it is computed here. Callers must keep the samples independent.

    ``features`` must be part of the graph of ``sample_losses`` (non-leaf tensors for nnU-Net's skips, or
    detached copies with ``requires_grad`` for a frozen encoder) and should be float32, with the path from
    them to the losses computed under :func:`full_precision`; the gradient (taken with
    ``create_graph=True``, so the penalty is differentiable with respect to the parameters; False gives its
    value alone, e.g. for a validation loss) and its squared norm are float32 whatever autocast is doing outside.
    """
    features = list(features)
    batch = features[0].shape[0]
    if sample_losses.shape != (batch,):
        raise ValueError(f"fisher_information_penalty takes one loss per sample, shape ({batch},), "
                         f"not {tuple(sample_losses.shape)}")
    with full_precision():
        grads = torch.autograd.grad(sample_losses.float().sum(), features, create_graph=create_graph,
                                    allow_unused=True)
        squared = sample_losses.new_zeros(batch, dtype=torch.float32)
        for grad in grads:
            if grad is not None:
                squared = squared + grad.float().pow(2).reshape(batch, -1).sum(1)
        return 0.5 * squared.mean()


@dataclass(frozen=True)
class FipEstimator:
    """How often a training step takes FIP's parameter gradient afresh (``calib_train --fip-estimator``).

    ``exact``: every step, on that step's batch — CalSAM Eq. 3's penalty and its exact gradient (double
    backward), as Algorithm 1. ``amortised``: afresh every ``every``-th step (and on the first step of a
    process); the steps between add the last fresh gradient λ1·∇FIP to their own segmentation (and CMP)
    gradient. That gradient is the exact per-sample FIP gradient of a batch drawn like every other, so it is
    unbiased over batches; it is stale by fewer than ``every`` optimiser steps. The double backward's cost is
    paid once per ``every`` steps.
    """
    name: str
    every: int = 1

    def __post_init__(self):
        if self.name not in FIP_ESTIMATORS:
            raise ValueError(f"FIP estimator {self.name!r}: choose {', '.join(FIP_ESTIMATORS)}")
        if int(self.every) != self.every or self.every < 1:
            raise ValueError(f"the FIP estimator's refresh interval must be a whole number of steps >= 1, "
                             f"not {self.every}")

    def fresh(self, step: int, have_gradient: bool) -> bool:
        """Whether training step ``step`` (counted from 0 over the whole run) takes FIP afresh."""
        return self.name == "exact" or not have_gradient or step % self.every == 0


FIP_ESTIMATORS = ("exact", "amortised")


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
                        regions: bool = False, include_background: bool = False, smooth: float = 1e-5,
                        pool=None) -> torch.Tensor:
    """1 − mean over classes of DSC++ (Yeung et al. 2023), computed over the whole batch:

        DSC++ = (2·TP + s) / (2·TP + Σ (p·(1−y))^γ + Σ ((1−p)·y)^γ + s)

    Raising each voxel's false-positive and false-negative contribution to γ > 1 penalises confident
    errors more than hesitant ones; γ = 1 gives the soft Dice loss. ``pool``, where given, maps each
    per-class sum (TP, FP and FN terms) of this part of the batch to the sum over the whole batch (on several
    GPUs: the sum over the ranks' parts, as nnU-Net pools its batch Dice).
    """
    tp, fp, fn = dice_plus_plus_sums(logits, target, gamma, regions, include_background)
    if pool is not None:
        tp, fp, fn = pool(tp), pool(fp), pool(fn)
    dsc = (2 * tp + smooth) / (2 * tp + fp + fn + smooth)
    return 1 - dsc.mean()


def dice_plus_plus_sums(logits: torch.Tensor, target: torch.Tensor, gamma: float = DEFAULT_DICEPP_GAMMA,
                        regions: bool = False, include_background: bool = False) -> tuple:
    """Per class, summed over the batch and the voxels: TP, Σ (p·(1−y))^γ and Σ ((1−p)·y)^γ of DSC++."""
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
    return tp, fp, fn
