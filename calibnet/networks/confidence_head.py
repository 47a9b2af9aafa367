"""Image-level confidence prediction (the confidence-prediction paper, §3 and Algorithm 1), as pieces that a
trainer wires in: the head, the adversarial perturbation, the α update and the one-batch buffer.

- :class:`ConfidenceHead` — wide but shallow: two 3×3(×3) convolution blocks reduce the channels to 8, an
  adaptive average pool brings any spatial size to ``pooled_size`` per axis (features of any case size
  need a fixed-size reduction before the fully connected layers), then two fully connected layers through
  a hidden size of 128 give scores in [0, 1] (e.g. volumetric Dice and NSD). ``dims`` is the number of
  spatial axes of the network it reads: 3 for 3d_fullres, 2 for 2d (one score row per slice); the
  convolution, normalisation and pooling ops are chosen from it as nnU-Net does
  (``convert_dim_to_conv_op``).
- :func:`adversarial_perturbation` — δ = −α·∇ₓC / (‖∇ₓC‖² + ε) per sample: one gradient step that the head
  expects to lower its predicted score by about α (first-order Taylor expansion).
- :func:`update_alpha` — α ← α − η·(observed predicted drop − Δs), so the predicted drop tracks Δs.
- :class:`AdversarialBuffer` — the previous batch's perturbed inputs and targets, the adversarial half of
  the next batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from dynamic_network_architectures.building_blocks.helper import (convert_dim_to_conv_op, get_matching_instancenorm,
                                                                  get_matching_pool_op)

from calibnet.errors import CalibnetError

ALPHA_START = 0.8
ETA = 0.01
DELTA_S = 0.1
WARMUP_BATCHES = 100

# A trained head lives inside its base run's folder; folder name -> prefix of its scores in confidence.json.
HEAD_FOLDERS = {"confidence_head": "adversarial_head", "confidence_head_plain": "plain_head"}


def head_folder(base_run: Path, adversarial: bool) -> Path:
    return Path(base_run) / ("confidence_head" if adversarial else "confidence_head_plain")


class ConfidenceHead(torch.nn.Module):
    def __init__(self, in_channels: int, dims: int = 3, hidden: int = 128, pooled_size: int = 4, outputs: int = 2):
        super().__init__()
        if dims not in (2, 3):
            raise CalibnetError(f"a confidence head reads 2-D or 3-D features, not {dims}-D ones.")
        self.dims = dims
        conv = convert_dim_to_conv_op(dims)
        norm = get_matching_instancenorm(conv)
        middle = max(8, in_channels // 2)
        self.features = torch.nn.Sequential(
            conv(in_channels, middle, 3, padding=1), norm(middle, affine=True), torch.nn.LeakyReLU(inplace=True),
            conv(middle, 8, 3, padding=1), norm(8, affine=True), torch.nn.LeakyReLU(inplace=True))
        self.pool = get_matching_pool_op(conv, adaptive=True, pool_type="avg")(pooled_size)
        self.scores = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(8 * pooled_size ** dims, hidden),
                                          torch.nn.LeakyReLU(inplace=True), torch.nn.Linear(hidden, outputs))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C, *spatial) penultimate-decoder features, ``dims`` spatial axes -> (B, outputs) scores in [0, 1]."""
        if features.ndim != self.dims + 2:
            raise CalibnetError(f"a {self.dims}-D confidence head takes (batch, channels, {self.dims} spatial axes) "
                                f"features, got shape {tuple(features.shape)}.")
        return torch.sigmoid(self.scores(self.pool(self.features(features))))


def feature_stage(network: torch.nn.Module) -> torch.nn.Module:
    """The decoder stage whose output is the penultimate resolution level of an nnU-Net U-Net (half the input
    resolution), where the head is attached."""
    network = getattr(network, "_orig_mod", network)
    stages = getattr(getattr(network, "decoder", None), "stages", None)
    if stages is None or len(stages) < 2:
        raise CalibnetError(f"{type(network).__name__} has no U-Net decoder with two or more stages to attach a "
                            f"confidence head to.")
    return stages[-2]


def feature_channels(network: torch.nn.Module) -> int:
    """Channels of :func:`feature_stage`'s output (nnU-Net decoders mirror the encoder's widths)."""
    network = getattr(network, "_orig_mod", network)
    return int(network.encoder.output_channels[1])


def score_names(foreground: list) -> list:
    """Output order of the head: volumetric Dice per foreground label/region, then NSD per label/region."""
    return [f"dice:{name}" for name in foreground] + [f"nsd:{name}" for name in foreground]


def adversarial_perturbation(x: torch.Tensor, predicted_score: torch.Tensor, alpha: float,
                             eps: float = 1e-8) -> torch.Tensor:
    """x' = x − α·g / (‖g‖² + ε) with g = ∂C/∂x per sample; ``predicted_score`` is (B,) and depends on x."""
    (grad,) = torch.autograd.grad(predicted_score.sum(), x, retain_graph=True)
    norm2 = grad.pow(2).reshape(grad.shape[0], -1).sum(1).reshape(-1, *([1] * (grad.ndim - 1)))
    return (x - alpha * grad / (norm2 + eps)).detach()


def update_alpha(alpha: float, predicted_drop: float, delta_s: float = DELTA_S, eta: float = ETA) -> float:
    """α ← α − η·(predicted drop − Δs): a larger drop than wanted shrinks the step, a smaller one grows it."""
    return alpha - eta * (predicted_drop - delta_s)


@dataclass
class AdversarialBatch:
    """The adversarial half of the next batch: perturbed copies of this batch's clean inputs, their (unchanged)
    ground truth, and the head's predicted and the true scores of the clean originals (for the drops)."""
    inputs: torch.Tensor
    targets: torch.Tensor
    clean_predicted: torch.Tensor  # (B,) C(z) of the originals
    clean_true: torch.Tensor  # (B,) g(f(x), y) of the originals


class AdversarialBuffer:
    """Holds the perturbed copies of the previous batch for the next batch (ADV_BUFFER of Algorithm 1)."""

    def __init__(self):
        self.batch = None

    def __bool__(self) -> bool:
        return self.batch is not None

    def put(self, batch: AdversarialBatch) -> None:
        self.batch = AdversarialBatch(*(t.detach() for t in (batch.inputs, batch.targets, batch.clean_predicted,
                                                              batch.clean_true)))

    def take(self) -> AdversarialBatch:
        """The previous batch's adversarial copies; the buffer is emptied."""
        batch, self.batch = self.batch, None
        return batch
