"""nnunet_dropout: nnU-Net with dropout (p = 0.1) after every convolution, the base model of the
MC-dropout score-agreement baseline (Roy et al. 2018).

The dropout layers are :class:`MCDropout` variants: off in evaluation mode as usual, but switched on for
Monte-Carlo sampling at prediction time (nnU-Net's predictor puts the network in eval mode itself).
"""
from __future__ import annotations

from copy import deepcopy

import torch
import torch.nn.functional as F
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from calibnet.trainers.nnUNetTrainerCalib import nnUNetTrainerCalib

DROPOUT_P = 0.1


class MCDropout(torch.nn.Dropout):
    """Element-wise dropout that stays active in eval mode while ``sampling`` is set."""

    sampling = False

    def forward(self, x):
        return F.dropout(x, self.p, self.training or self.sampling, self.inplace)


def set_mc_sampling(network: torch.nn.Module, active: bool) -> int:
    """Switch Monte-Carlo sampling on or off for every MCDropout layer; returns how many there are."""
    layers = [m for m in network.modules() if isinstance(m, MCDropout)]
    for layer in layers:
        layer.sampling = active
    return len(layers)


class nnUNetTrainerDropout(nnUNetTrainerCalib):
    """nnU-Net with MC-capable dropout (p = 0.1) in every convolution block."""

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                                   enable_deep_supervision: bool = True):
        with_dropout = deepcopy(configuration_manager)
        with_dropout.configuration = deepcopy(configuration_manager.configuration)
        arch = with_dropout.configuration["architecture"]["arch_kwargs"]
        arch["dropout_op"] = f"{MCDropout.__module__}.{MCDropout.__name__}"
        arch["dropout_op_kwargs"] = {"p": DROPOUT_P, "inplace": False}
        return nnUNetTrainer.build_network_architecture(plans_manager, with_dropout, num_input_channels,
                                                        num_output_channels, enable_deep_supervision)
