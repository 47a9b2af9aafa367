"""Calibration baselines that only change nnU-Net's loss: focal loss and Dice++."""
from __future__ import annotations

import numpy as np
import torch
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.utilities.helpers import softmax_helper_dim1

from calibnet.losses import DEFAULT_DICEPP_GAMMA, DEFAULT_FOCAL_GAMMA, dice_plus_plus_loss, focal_loss
from calibnet.trainers.nnUNetTrainerCalib import nnUNetTrainerCalib


class DiceAndFocalLoss(torch.nn.Module):
    """nnU-Net's soft Dice plus focal loss in place of cross-entropy."""

    def __init__(self, dice: torch.nn.Module, gamma: float, regions: bool):
        super().__init__()
        self.dice, self.gamma, self.regions = dice, gamma, regions

    def forward(self, logits, target):
        return self.dice(logits, target) + focal_loss(logits, target, self.gamma, self.regions)


def _sum_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """A batch sum of this rank's part, summed over every rank with nnU-Net's AllGatherGrad (as its batch Dice)."""
    from nnunetv2.utilities.ddp_allgather import AllGatherGrad

    return AllGatherGrad.apply(value).sum(0)


class DicePlusPlusLoss(torch.nn.Module):
    """Dice++ over the whole batch; with ``ddp``, over the batch of every GPU together (not each GPU's part)."""

    def __init__(self, gamma: float, regions: bool, ddp: bool = False):
        super().__init__()
        self.gamma, self.regions, self.ddp = gamma, regions, ddp

    def forward(self, logits, target):
        return dice_plus_plus_loss(logits, target, self.gamma, self.regions,
                                   pool=_sum_over_ranks if self.ddp else None)


class _LossVariant(nnUNetTrainerCalib):
    def _wrap_deep_supervision(self, loss: torch.nn.Module) -> torch.nn.Module:
        """nnU-Net's deep-supervision weighting (halving per scale, lowest output unused)."""
        if not self.enable_deep_supervision:
            return loss
        scales = self._get_deep_supervision_scales()
        weights = np.array([1 / (2 ** i) for i in range(len(scales))])
        weights[-1] = 0
        return DeepSupervisionWrapper(loss, weights / weights.sum())


class nnUNetTrainerFocal(_LossVariant):
    """nnU-Net with focal loss (γ = 2) instead of cross-entropy, next to its Dice loss."""

    focal_gamma = DEFAULT_FOCAL_GAMMA

    def _build_loss(self):
        regions = self.label_manager.has_regions
        # as in nnU-Net: sigmoid Dice over all regions, or softmax Dice without the background class
        dice = MemoryEfficientSoftDiceLoss(apply_nonlin=torch.sigmoid if regions else softmax_helper_dim1,
                                           batch_dice=self.configuration_manager.batch_dice, do_bg=regions,
                                           smooth=1e-5, ddp=self.is_ddp)
        return self._wrap_deep_supervision(DiceAndFocalLoss(dice, self.focal_gamma, regions))


class nnUNetTrainerDicePP(_LossVariant):
    """nnU-Net trained with the Dice++ loss (γ = 2) alone (Yeung et al. 2023)."""

    dicepp_gamma = DEFAULT_DICEPP_GAMMA

    def _build_loss(self):
        return self._wrap_deep_supervision(DicePlusPlusLoss(self.dicepp_gamma, self.label_manager.has_regions,
                                                            ddp=self.is_ddp))
