"""SafeClick on LiteMedSAM's decoder (``safeclick_lite``, or ``safeclick --backbone litemedsam``) and its ablations.

No paper has this: the SafeClick plug-in (``calibnet.networks.safeclick_sam``) on segment-anything's mask
decoder, so the method can be trained and measured from pretrained weights on a CPU. The backbone is a SAM
method's (--sam-model/--sam-checkpoint: the packaged LiteMedSAM by default; SAM/MedSAM ViTs; ``tiny`` for
tests), with its preprocessing (LiteMedSAM and MedSAM read one channel in [0, 1]). Training is SafeClick's
(``SafeClickTraining``): image and prompt encoders frozen and every slice encoded once, the mask decoder and
the plug-in trained with AdamW, lr 1e-4, cosine decay, 8 slices per batch, Dice + BCE, one imperfect prompt
per slice.

``samft_imperfect`` (``nnUNetTrainerSAMFTImperfect``, or ``sam2ft --backbone litemedsam``) is its baseline, as
``sam2ft`` is SafeClick's on SAM 2: the same backbone and training without the plug-in — the plain
``SamSliceSegmenter`` of ``samft``, whose recipe (CalSAM's centroid + background point, Adam) differs from
safeclick_lite's by more than the plug-in.
"""
from __future__ import annotations

from calibnet.networks.safeclick_sam import SafeClickSamSegmenter
from calibnet.networks.sam_backbone import SamConfig, build_sam
from calibnet.trainers.nnUNetTrainerSAM import nnUNetTrainerSAMFT
from calibnet.trainers.nnUNetTrainerSAM2 import ImperfectPromptTraining, SafeClickTraining


class nnUNetTrainerSAMFTImperfect(ImperfectPromptTraining, nnUNetTrainerSAMFT):
    """SAM-FT (a SAM 1-family decoder, LiteMedSAM by default) trained with SafeClick's recipe: one imperfect prompt
    per slice, AdamW, cosine decay. ``safeclick_lite`` without the plug-in; the network is ``samft``'s."""


class nnUNetTrainerSafeClickLite(SafeClickTraining, nnUNetTrainerSAMFT):
    """SafeClick on a SAM 1-family decoder (LiteMedSAM by default), trained on imperfect prompts."""

    network_options = {}  # e1/e2/crl; the ablation trainers below switch one off

    @classmethod
    def network_for(cls, sam_config: SamConfig, load_weights: bool = True, **options) -> SafeClickSamSegmenter:
        return SafeClickSamSegmenter(build_sam(sam_config, load_weights), use_box=cls.use_box,
                                     unit_intensities=cls.unit_intensities(sam_config),
                                     image_channel=sam_config.image_channel, options=cls.safeclick_options(options))


class nnUNetTrainerSafeClickLiteNoE1(nnUNetTrainerSafeClickLite):
    """Ablation: SafeClick on LiteMedSAM without the cross-attention expert E1."""

    network_options = {"e1": False}


class nnUNetTrainerSafeClickLiteNoE2(nnUNetTrainerSafeClickLite):
    """Ablation: SafeClick on LiteMedSAM without the self-attention expert E2."""

    network_options = {"e2": False}


class nnUNetTrainerSafeClickLiteNoCRL(nnUNetTrainerSafeClickLite):
    """Ablation: SafeClick on LiteMedSAM without the consensus reasoning layer (experts summed)."""

    network_options = {"crl": False}
