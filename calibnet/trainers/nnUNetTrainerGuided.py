"""guided_nnunet: nnU-Net given the SAM methods' two point prompts as extra input channels.

The prompts (per slice: ground-truth centroid as foreground point, a distant background point, see
``calibnet.prompts``) are drawn from each training patch's ground truth and encoded as Gaussian heat maps,
appended after the image channels — at training, validation and prediction time alike.
"""
from __future__ import annotations

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from calibnet.prompts import PROMPT_CHANNELS, point_prompt_heatmaps
from calibnet.trainers.nnUNetTrainerCalib import nnUNetTrainerCalib


def foreground_of(target: torch.Tensor) -> np.ndarray:
    """(B, *spatial) boolean foreground of a label map (B, 1, ...) or region masks (B, R, ...)."""
    target = target.detach().cpu()
    return (target[:, 0] > 0).numpy() if target.shape[1] == 1 else (target > 0).any(1).numpy()


def prompt_channels(foreground: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
    """(B, 2, *spatial) heat maps for a batch of 3-D foregrounds (or one (2, ...) for a single volume)."""
    if foreground.ndim == 3:
        return torch.from_numpy(point_prompt_heatmaps(foreground, rng))
    return torch.from_numpy(np.stack([point_prompt_heatmaps(f, rng) for f in foreground]))


class nnUNetTrainerGuided(nnUNetTrainerCalib):
    """nnU-Net with point-prompt heat maps as two extra input channels."""

    requires_prompts = True

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                                   enable_deep_supervision: bool = True):
        return nnUNetTrainer.build_network_architecture(plans_manager, configuration_manager,
                                                        num_input_channels + PROMPT_CHANNELS, num_output_channels,
                                                        enable_deep_supervision)

    @classmethod
    def prompt_inputs(cls, foreground: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
        """The heat-map channels appended to a preprocessed volume at prediction time."""
        return prompt_channels(foreground, rng)

    def _with_prompts(self, batch: dict) -> dict:
        target = batch["target"][0] if isinstance(batch["target"], list) else batch["target"]
        rng = np.random.default_rng(int(torch.randint(0, 2 ** 31 - 1, (1,))))
        heatmaps = prompt_channels(foreground_of(target), rng).to(batch["data"].dtype)
        return dict(batch, data=torch.cat([batch["data"], heatmaps.to(batch["data"].device)], 1))

    def train_step(self, batch: dict) -> dict:
        return super().train_step(self._with_prompts(batch))

    def validation_step(self, batch: dict) -> dict:
        return super().validation_step(self._with_prompts(batch))
