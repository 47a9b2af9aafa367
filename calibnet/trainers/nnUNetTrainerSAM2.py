"""SAM 2-backed methods (SafeClick paper): zero-shot SAM 2, SAM 2 with its decoder fine-tuned, and SafeClick.

They share the SAM methods' slice-wise data path (``nnUNetTrainerSAM``): whole axial slices with
foreground, frozen image encoder with every slice encoded once and cached, prompt encoder frozen. What
trains is SAM 2's mask decoder (``sam2ft``), or the mask decoder with the SafeClick plug-in inside it
(``safeclick``; the paper trains "only the SafeClick module", whose E3 is SAM 2's own decoder
transformer) — AdamW, lr 1e-4, cosine decay, 8 slices per batch, Dice + BCE. Training prompts come from
SafeClick's imperfect-prompt distribution: per slice, either one point displaced from the centre of mass
by U(0, 1) × the object radius or the ground-truth box scaled by U(0.5, 1.5), each with probability ½.

That training (:class:`ImperfectPromptTraining`, :class:`SafeClickTraining`) is shared with SafeClick on
LiteMedSAM's decoder (``calibnet.trainers.nnUNetTrainerSafeClickLite``).
"""
from __future__ import annotations

from dataclasses import asdict, fields

import numpy as np
import torch

from calibnet.prompt_quality import displaced_point, scaled_box
from calibnet.prompts import slice_box
from calibnet.trainers.nnUNetTrainerSAM import CosineLR, nnUNetTrainerSAMFT
from calibnet.networks.safeclick import SafeClickOptions, SafeClickSegmenter
from calibnet.networks.sam2_backbone import Sam2Config, Sam2SliceSegmenter, build_sam2_model

DISPLACEMENT_RANGE = (0.0, 1.0)  # × the object radius (the paper evaluates 25–100 %)
BOX_SCALE_RANGE = (0.5, 1.5)


def imperfect_prompt(mask: np.ndarray, rng: np.random.Generator) -> dict:
    """One training prompt of a 2-D mask: a displaced point or a scaled box, with probability ½ each."""
    if rng.uniform() < 0.5:
        return {"points": [list(displaced_point(mask, rng.uniform(*DISPLACEMENT_RANGE), rng))], "labels": [1]}
    return {"box": scaled_box(slice_box(mask), rng.uniform(*BOX_SCALE_RANGE), mask.shape)}


class ImperfectPromptTraining:
    """SafeClick's training of a slice-wise SAM trainer (a mixin before ``nnUNetTrainerSAMFT``): AdamW with cosine
    decay, one imperfect prompt per slice."""

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.trainable_parameters(), lr=self.initial_lr)
        return optimizer, CosineLR(optimizer, self.initial_lr, self.num_epochs)

    def slice_prompts(self, keys: list) -> list:
        """Imperfect training prompts, reproducible from the seed, case, slice and epoch."""
        prompts = []
        for case_id, z in keys:
            rng = self.slice_rng(case_id, z, per_epoch=True)
            prompts.append(imperfect_prompt(self.volumes[case_id][1][z], rng))
        return prompts


class SafeClickTraining(ImperfectPromptTraining):
    """What every SafeClick trainer adds, whatever its backbone: the plug-in's options (``network_options``:
    e1/e2/crl, which the ablation trainers switch off) and a log line about the plug-in."""

    network_options = {}

    @classmethod
    def safeclick_options(cls, options: dict) -> SafeClickOptions:
        """The plug-in's options: the class's, overridden by ``options`` (a run's record; other keys ignored)."""
        names = {f.name for f in fields(SafeClickOptions)}
        return SafeClickOptions(**{k: v for k, v in {**cls.network_options, **options}.items() if k in names})

    def initialize(self):
        super().initialize()
        plugin = self.network.plugin_parameters()
        self.print_to_log_file(f"{self.network.plugin.options.describe()}: {sum(p.numel() for p in plugin)} plug-in "
                               f"parameters; options {asdict(self.network.plugin.options)}")


class nnUNetTrainerSAM2FT(ImperfectPromptTraining, nnUNetTrainerSAMFT):
    """SAM 2 with its mask decoder fine-tuned on imperfect prompts (the SafeClick paper's "SAM 2" rows)."""

    sam_config = Sam2Config()
    network_options = {}

    @classmethod
    def backbone_config(cls, record: dict) -> Sam2Config:
        return Sam2Config(**record)

    @classmethod
    def network_for(cls, sam_config: Sam2Config, load_weights: bool = True, **_options) -> Sam2SliceSegmenter:
        return Sam2SliceSegmenter(build_sam2_model(sam_config, load_weights), use_box=cls.use_box)


class nnUNetTrainerSAM2ZeroShot(nnUNetTrainerSAM2FT):
    """SAM 2 as it is: no training."""

    trains = False


class nnUNetTrainerSafeClick(SafeClickTraining, nnUNetTrainerSAM2FT):
    """SafeClick: SAM 2's mask decoder with the CEL/CRL plug-in, trained on imperfect prompts."""

    network_options = {}  # e1/e2/crl; the ablation trainers below switch one off

    @classmethod
    def network_for(cls, sam_config: Sam2Config, load_weights: bool = True, **options) -> SafeClickSegmenter:
        return SafeClickSegmenter(build_sam2_model(sam_config, load_weights), use_box=cls.use_box,
                                  options=cls.safeclick_options(options))


class nnUNetTrainerSafeClickNoE1(nnUNetTrainerSafeClick):
    """Ablation: SafeClick without the cross-attention expert E1."""

    network_options = {"e1": False}


class nnUNetTrainerSafeClickNoE2(nnUNetTrainerSafeClick):
    """Ablation: SafeClick without the self-attention expert E2."""

    network_options = {"e2": False}


class nnUNetTrainerSafeClickNoCRL(nnUNetTrainerSafeClick):
    """Ablation: SafeClick without the consensus reasoning layer (experts summed)."""

    network_options = {"crl": False}
