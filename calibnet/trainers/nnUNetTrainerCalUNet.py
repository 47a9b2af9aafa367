"""calunet and its ablations: nnU-Net + λ1·FIP + λ2·CMP (CalSAM's penalties on a trainable U-Net).

FIP is taken on the encoder's skip features, which stay in the graph (not detached), so the penalty's
gradient reaches both encoder and decoder. z is the decoder's input: float32 copies of the skips, so
∂L/∂z is the gradient through the decoder (not also through the later encoder stages that read a skip).
A "sample" is one patch of the batch. The training segmentation loss is nnU-Net's full deep-supervised
Dice + CE (Dice + BCE for region datasets) as nnU-Net computes it (batch Dice where the plans say so);
the FIP differentiates the same loss evaluated on each patch alone (every deep-supervision output and
target sliced to that patch), because FIP is ½·mean_b ‖∂L(x_b)/∂z_b‖² of each sample's own loss. nnU-Net's
instance normalisation keeps the patches independent (a batch-normalised network is refused), so one
gradient of Σ_b L_b gives every g_b. With FIP on, the decoder runs in float32 (autocast off): the inner
gradient is ≈ 1/N_voxels per voxel and would underflow in float16. CMP is applied to the highest-resolution
output only: the deep-supervision outputs at lower resolutions are supervision aids, while calibration is
judged on the final softmax.
"""
from __future__ import annotations

import torch
from nnunetv2.utilities.helpers import dummy_context
from torch import autocast

from calibnet.errors import CalibnetError
from calibnet.losses import (DEFAULT_CMP_GAMMA, DEFAULT_CMP_TAU, DEFAULT_LAMBDA_CMP, DEFAULT_LAMBDA_FIP,
                                      confidence_misalignment_penalty, fisher_information_penalty, full_precision)
from calibnet.trainers.nnUNetTrainerCalib import nnUNetTrainerCalib


def _sample(value, index: int):
    """Sample ``index`` of a batch tensor or of each tensor of a deep-supervision list, batch axis kept."""
    if isinstance(value, (list, tuple)):
        return [v[index:index + 1] for v in value]
    return value[index:index + 1]


class nnUNetTrainerCalUNet(nnUNetTrainerCalib):
    """nnU-Net + λ1·FIP (encoder skips) + λ2·CMP (final softmax)."""

    lambda_fip = DEFAULT_LAMBDA_FIP
    # at λ1 = 0.3 FIP is ~0.03 % of the training gradient's norm here, so reusing its gradient between refreshes
    # leaves each step's gradient as it is (cosine ≥ 0.9999 to exact FIP's on real batches) at ~1.1× nnunet's step
    fip_estimator = "amortised"
    lambda_cmp = DEFAULT_LAMBDA_CMP
    cmp_tau = DEFAULT_CMP_TAU
    cmp_gamma = DEFAULT_CMP_GAMMA
    _samples_checked = False
    supports_ddp = False  # unet_cmp, without FIP, does
    no_ddp_reason = ("FIP takes torch.autograd.grad (create_graph=True) of the loss with respect to the encoder's skip "
                     "features, running encoder and decoder apart; PyTorch's DistributedDataParallel does not work "
                     "with torch.autograd.grad and would not average these gradients across GPUs.")

    def _check_samples_independent(self) -> None:
        """FIP takes every g_b from one gradient of Σ_b L_b, which needs patches that do not interact."""
        if self._samples_checked:
            return
        coupled = [type(m).__name__ for m in self.network.modules()
                   if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        if coupled:
            raise CalibnetError(f"FIP needs a network that treats every patch of a batch on its own, but this one "
                                f"has {coupled[0]} layers (the plans' norm_op): use instance normalisation, as "
                                f"nnU-Net's default plans do, or --lambda-fip 0.")
        self._samples_checked = True

    def sample_losses(self, output, target) -> torch.Tensor:
        """nnU-Net's (deep-supervised) segmentation loss of each patch on its own, shape (B,)."""
        final = output[0] if isinstance(output, (list, tuple)) else output
        return torch.stack([self.loss(_sample(output, b), _sample(target, b)) for b in range(final.shape[0])])

    def loss_terms(self, data: torch.Tensor, target) -> dict:
        """Segmentation loss, FIP and CMP of one batch (the encoder under autocast on CUDA, as nnU-Net does). On
        the steps of the amortised estimator that reuse the last FIP gradient the network runs as nnU-Net's."""
        fresh_fip = self.lambda_fip and self.fip_due()
        with autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            if not fresh_fip:  # the network's own forward (decoder(encoder(x))), through DDP's wrapper if any
                output = self.network(data)
                terms = {"segmentation loss": self.loss(output, target)}
            else:
                skips = self.network.encoder(data)
        if fresh_fip:
            self._check_samples_independent()
            with full_precision():
                z = [s.to(torch.float32, copy=True) for s in skips]  # the decoder's input, still in the graph
                output = self.network.decoder(z)
                terms = {"segmentation loss": self.loss(output, target),
                         "FIP": fisher_information_penalty(self.sample_losses(output, target), z)}
        elif self.lambda_fip:
            terms["FIP"] = self.amortised_fip_value()
        if self.lambda_cmp:
            final_output = output[0] if isinstance(output, (list, tuple)) else output
            final_target = target[0] if isinstance(target, list) else target
            with full_precision():
                terms["CMP"] = confidence_misalignment_penalty(final_output.float(), final_target, self.cmp_tau,
                                                               self.cmp_gamma, self.label_manager.has_regions)
        return terms

    def calib_train_step(self, batch: dict) -> dict:
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        target = [t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list) \
            else target.to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        terms = self.loss_terms(data, target)
        self.check_finite(terms)
        terms["total loss"] = terms["segmentation loss"] + self.lambda_fip * terms.get("FIP", 0) + \
            self.lambda_cmp * terms.get("CMP", 0)
        self.check_finite({"total loss": terms["total loss"]})
        self.fip_backward_and_step(terms, self.network.parameters())
        return {"loss": terms["total loss"].detach().cpu().numpy()}


class nnUNetTrainerUNetFIP(nnUNetTrainerCalUNet):
    """Ablation: nnU-Net + λ1·FIP only."""

    lambda_cmp = 0.0


class nnUNetTrainerUNetCMP(nnUNetTrainerCalUNet):
    """Ablation: nnU-Net + λ2·CMP only."""

    lambda_fip = 0.0
    supports_ddp = True  # without FIP the step runs the network's own forward and one backward
    no_ddp_reason = ""
