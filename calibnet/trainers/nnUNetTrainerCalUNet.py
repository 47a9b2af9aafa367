"""calunet and its ablations: nnU-Net + λ1·FIP + λ2·CMP (CalSAM's penalties on a trainable U-Net).

FIP is taken on the encoder's skip features, which stay in the graph (not detached), so the penalty's
gradient reaches both encoder and decoder. The segmentation loss it differentiates is nnU-Net's full
deep-supervised Dice + CE (Dice + BCE for region datasets). CMP is applied to the highest-resolution
output only: the deep-supervision outputs at lower resolutions are supervision aids, while calibration
is judged on the final softmax.
"""
from __future__ import annotations

from nnunetv2.utilities.helpers import dummy_context
from torch import autocast

from calibnet.trainers.losses import (DEFAULT_CMP_GAMMA, DEFAULT_CMP_TAU, DEFAULT_LAMBDA_CMP, DEFAULT_LAMBDA_FIP,
                                      confidence_misalignment_penalty, fisher_information_penalty)
from calibnet.trainers.nnUNetTrainerCalib import nnUNetTrainerCalib


class nnUNetTrainerCalUNet(nnUNetTrainerCalib):
    """nnU-Net + λ1·FIP (encoder skips) + λ2·CMP (final softmax)."""

    lambda_fip = DEFAULT_LAMBDA_FIP
    lambda_cmp = DEFAULT_LAMBDA_CMP
    cmp_tau = DEFAULT_CMP_TAU
    cmp_gamma = DEFAULT_CMP_GAMMA

    def calib_train_step(self, batch: dict) -> dict:
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        target = [t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list) \
            else target.to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            skips = self.network.encoder(data)
            output = self.network.decoder(skips)
            terms = {"segmentation loss": self.loss(output, target)}
            if self.lambda_fip:
                terms["FIP"] = fisher_information_penalty(terms["segmentation loss"], skips)
            if self.lambda_cmp:
                final_output = output[0] if isinstance(output, (list, tuple)) else output
                final_target = target[0] if isinstance(target, list) else target
                terms["CMP"] = confidence_misalignment_penalty(final_output, final_target, self.cmp_tau,
                                                               self.cmp_gamma, self.label_manager.has_regions)
        self.check_finite(terms)
        total = terms["segmentation loss"] + self.lambda_fip * terms.get("FIP", 0) + \
            self.lambda_cmp * terms.get("CMP", 0)
        self.check_finite({"total loss": total})
        self.backward_and_step(total, self.network.parameters())
        return {"loss": total.detach().cpu().numpy()}


class nnUNetTrainerUNetFIP(nnUNetTrainerCalUNet):
    """Ablation: nnU-Net + λ1·FIP only."""

    lambda_cmp = 0.0


class nnUNetTrainerUNetCMP(nnUNetTrainerCalUNet):
    """Ablation: nnU-Net + λ2·CMP only."""

    lambda_fip = 0.0
