"""medsam_u: MedSAM-U (MedSAM-U paper, §III, Algorithm 1) on the slice-wise SAM backbone.

- MPA training: bottleneck adapters in the image encoder's blocks (``calibnet.networks.sam_adapters``) and
  the prompt encoder train; everything else — the pretrained encoder weights and the mask decoder — stays
  frozen (checked when the trainer is initialised). Prompts per training slice: 1–3 random foreground
  points and the ground-truth box jittered by δ ~ N(0, σ) per coordinate. Loss: α·binary focal (α = 0.25,
  γ = 2) + soft Dice (Eq. 15). The encoder trains, so its embeddings are not cached.
- Prediction: UGMP + UGPA per slice, in the network (:class:`calibnet.networks.medsam_u.MedSAMUSegmenter`).
"""
from __future__ import annotations

import numpy as np
import torch

from calibnet.errors import CalibnetError
from calibnet.prompts import slice_box
from calibnet.losses import binary_soft_dice_loss, focal_loss
from calibnet.trainers.nnUNetTrainerSAM import nnUNetTrainerSAMFT
from calibnet.networks.medsam_u import MedSAMUSegmenter
from calibnet.networks.sam_backbone import SamConfig, build_sam
from calibnet.uncertainty_prompting import jittered_boxes

FOCAL_ALPHA, FOCAL_GAMMA = 0.25, 2.0  # Eq. 15's scalar α and γ; the paper gives no values (Lin et al.'s usual ones)
TRAINING_BOX_SIGMA = 5.0  # pixels of jitter on the training boxes (ours; the paper does not state it)


class nnUNetTrainerMedSAMU(nnUNetTrainerSAMFT):
    """MedSAM-U: MPA training (adapters + prompt encoder), UGMP + UGPA at prediction."""

    use_box = True
    caches_embeddings = False
    predicts_with_mirroring = False  # UGMP's multiple prompts take the place of test-time augmentation
    reads_unit_intensities = True  # built on MedSAM, whose encoder reads [0, 1]
    slices_per_batch = 4
    network_options = {}  # adapter and UGMP/UGPA options, recorded in calibnet_run.json

    @classmethod
    def network_for(cls, sam_config: SamConfig, load_weights: bool = True, **options) -> MedSAMUSegmenter:
        return MedSAMUSegmenter(build_sam(sam_config, load_weights), unit_intensities=cls.unit_intensities(sam_config),
                                image_channel=sam_config.image_channel, **{**cls.network_options, **options})

    def initialize(self):
        super().initialize()
        trainable = {id(p) for p in self.trainable_parameters()}
        if not self.network.adapters or not trainable:
            raise CalibnetError("MedSAM-U needs at least one adapter block to train.")
        for parameter in self.network.parameters():  # the pretrained encoder and the mask decoder stay frozen
            parameter.requires_grad_(id(parameter) in trainable)
        self.print_to_log_file(f"MPA: {len(self.network.adapters)} adapters and the prompt encoder train "
                               f"({sum(p.numel() for p in self.trainable_parameters())} parameters); the rest "
                               f"is frozen")

    def trainable_parameters(self) -> list:
        return self.network.trainable_parameters()

    def embeddings(self, keys: list) -> torch.Tensor:
        """Fresh embeddings, with gradients into the adapters while training (nothing is cached)."""
        # one slice at a time: cases differ in in-plane size, and each slice is resized to SAM's input anyway
        return torch.cat([self.network.embed(self._slice(case_id, z)[None].to(self.device)) for case_id, z in keys])

    def _slice(self, case_id: str, z: int) -> torch.Tensor:
        return self.network.slice_images(self.volumes[case_id][0][:, z:z + 1])[0]

    def slice_prompts(self, keys: list) -> list:
        """Training prompts: 1–3 random foreground points and the jittered ground-truth box per slice."""
        prompts = []
        for case_id, z in keys:
            rng = self.slice_rng(case_id, z, per_epoch=True)
            mask = self.volumes[case_id][1][z]
            where = np.argwhere(mask)
            chosen = where[rng.choice(len(where), size=int(rng.integers(1, 4)))]
            box = jittered_boxes(slice_box(mask), 1, TRAINING_BOX_SIGMA, mask.shape, rng)[0]
            prompts.append({"points": chosen.tolist(), "labels": [1] * len(chosen), "box": box})
        return prompts

    def loss_terms(self, keys: list) -> dict:
        z = self.embeddings(keys)
        logits, target = self._forward(keys, z)
        terms = {"focal loss": FOCAL_ALPHA * focal_loss(logits, target, FOCAL_GAMMA, regions=True),
                 "Dice loss": binary_soft_dice_loss(logits, target)}
        self.check_finite(terms)
        terms["total loss"] = terms["focal loss"] + terms["Dice loss"]
        terms["logits"], terms["target"] = logits, target
        return terms
