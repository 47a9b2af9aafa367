"""Monte-Carlo dropout: dropout layers that stay off in evaluation mode as usual but can be switched on for
sampling at prediction time (nnU-Net's predictor puts the network in eval mode itself). nnunet_dropout
(``calibnet.trainers.nnUNetTrainerDropout``) builds nnU-Net's network with them; inference draws the
MC-dropout samples of the score-agreement baseline (Roy et al. 2018) with :func:`set_mc_sampling`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


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
