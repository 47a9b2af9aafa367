"""Method aliases (what users type) -> trainer classes, with one line each for ``calib_train --list``."""
from __future__ import annotations

import importlib
from dataclasses import dataclass

from calibnet.errors import CalibnetError


@dataclass(frozen=True)
class Method:
    alias: str
    module: str  # under calibnet.trainers
    class_name: str
    summary: str
    loss_options: tuple = ()  # trainer attributes that calib_train's loss flags may set
    uses_sam: bool = False
    trains_head: bool = False  # trains a confidence head on a finished base run (--base) instead of a network

    def trainer_class(self):
        return getattr(importlib.import_module(f"calibnet.trainers.{self.module}"), self.class_name)


METHODS = {m.alias: m for m in (
    Method("nnunet", "nnUNetTrainerCalib", "nnUNetTrainerCalib", "plain nnU-Net (Dice + CE), the baseline"),
    Method("calunet", "nnUNetTrainerCalUNet", "nnUNetTrainerCalUNet",
           "nnU-Net + 0.3·FIP on the encoder skips + 0.5·CMP on the final softmax",
           ("lambda_fip", "lambda_cmp", "cmp_tau", "cmp_gamma")),
    Method("unet_fip", "nnUNetTrainerCalUNet", "nnUNetTrainerUNetFIP", "ablation: nnU-Net + 0.3·FIP",
           ("lambda_fip",)),
    Method("unet_cmp", "nnUNetTrainerCalUNet", "nnUNetTrainerUNetCMP", "ablation: nnU-Net + 0.5·CMP",
           ("lambda_cmp", "cmp_tau", "cmp_gamma")),
    Method("focal", "nnUNetTrainerCalibrationLosses", "nnUNetTrainerFocal",
           "nnU-Net with Dice + focal loss (γ = 2), a calibration baseline", ("focal_gamma",)),
    Method("dicepp", "nnUNetTrainerCalibrationLosses", "nnUNetTrainerDicePP",
           "nnU-Net trained with the Dice++ loss (γ = 2, Yeung et al. 2023)", ("dicepp_gamma",)),
    Method("guided_nnunet", "nnUNetTrainerGuided", "nnUNetTrainerGuided",
           "nnU-Net given the SAM point prompts as Gaussian heat-map channels"),
    Method("nnunet_dropout", "nnUNetTrainerDropout", "nnUNetTrainerDropout",
           "nnU-Net with dropout p = 0.1, the base of the MC-dropout score agreement (predict with --mc-samples N)"),
    Method("confidence_head", "nnUNetTrainerConfidenceHead", "nnUNetTrainerConfidenceHead",
           "per-case Dice/NSD predictor on the frozen network of a trained --base run, adversarial training "
           "(--no-adversarial: plain head)", trains_head=True),
    Method("samft", "nnUNetTrainerSAM", "nnUNetTrainerSAMFT",
           "SAM-FT: frozen SAM encoders, mask decoder trained with Dice + BCE, point prompts per slice",
           uses_sam=True),
    Method("calsam", "nnUNetTrainerSAM", "nnUNetTrainerCalSAM",
           "CalSAM: SAM-FT + 0.3·FIP on the frozen embeddings + 0.5·CMP",
           ("lambda_fip", "lambda_cmp", "cmp_tau", "cmp_gamma"), uses_sam=True),
    Method("sam_fip", "nnUNetTrainerSAM", "nnUNetTrainerSAMFIP", "ablation: SAM-FT + 0.3·FIP", ("lambda_fip",),
           uses_sam=True),
    Method("sam_cmp", "nnUNetTrainerSAM", "nnUNetTrainerSAMCMP", "ablation: SAM-FT + 0.5·CMP",
           ("lambda_cmp", "cmp_tau", "cmp_gamma"), uses_sam=True),
    Method("vanilla_sam", "nnUNetTrainerSAM", "nnUNetTrainerVanillaSAM",
           "zero-shot SAM with the slice's ground-truth box (no training: calib_train only predicts)", uses_sam=True),
    Method("medsam_u", "nnUNetTrainerMedSAMU", "nnUNetTrainerMedSAMU",
           "MedSAM-U: adapters in the image encoder + prompt encoder trained (focal + Dice, points and jittered "
           "boxes); UGMP + UGPA at prediction", uses_sam=True),
    Method("medsam", "nnUNetTrainerSAM", "nnUNetTrainerMedSAM",
           "SAM-FT from a MedSAM checkpoint (--sam-checkpoint medsam_vit_b.pth)", uses_sam=True),
)}


def get_method(alias: str) -> Method:
    if alias not in METHODS:
        raise CalibnetError(f"unknown method {alias!r}; choose from {', '.join(METHODS)} (calib_train --list).")
    return METHODS[alias]


def method_of_trainer(class_name: str) -> Method:
    for method in METHODS.values():
        if method.class_name == class_name:
            return method
    raise CalibnetError(f"checkpoint was written by trainer {class_name}, which calibnet does not know.")
