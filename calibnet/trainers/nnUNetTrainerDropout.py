"""nnunet_dropout: nnU-Net with dropout (p = 0.1) after every convolution, the base model of the
MC-dropout score-agreement baseline (Roy et al. 2018).

The dropout layers are :class:`calibnet.networks.mc_dropout.MCDropout`: off in evaluation mode as usual,
but switched on for Monte-Carlo sampling at prediction time.
"""
from __future__ import annotations

from copy import deepcopy

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from calibnet.networks.mc_dropout import MCDropout
from calibnet.trainers.nnUNetTrainerCalib import nnUNetTrainerCalib

DROPOUT_P = 0.1


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
