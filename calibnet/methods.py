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
    uses_sam: bool = False  # a slice-wise SAM or SAM 2 method (binary target, prompts)
    uses_sam2: bool = False  # its backbone comes from the sam2 package (--sam2-* flags)
    trains_head: bool = False  # trains a confidence head on a finished base run (--base) instead of a network

    def trainer_class(self):
        try:
            module = importlib.import_module(f"calibnet.trainers.{self.module}")
        except ModuleNotFoundError as e:
            if e.name != "sam2":
                raise
            raise CalibnetError(f"{self.alias} needs the sam2 package, which is not installed: run `make install`, "
                                f"or SAM2_BUILD_CUDA=0 pip install --no-build-isolation sam2==1.1.0 (after torch)."
                                ) from None
        return getattr(module, self.class_name)


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
    Method("samft_focal", "nnUNetTrainerSAM", "nnUNetTrainerSAMFTFocal",
           "SAM-FT with Dice + focal loss (γ = 2) instead of Dice + BCE (CalSAM Table 3's \"+ Focal Loss\")",
           ("focal_gamma",), uses_sam=True),
    Method("samft_dicepp", "nnUNetTrainerSAM", "nnUNetTrainerSAMFTDicePP",
           "SAM-FT trained with the Dice++ loss (γ = 2) instead of Dice + BCE (CalSAM Table 3's \"+ Dice++\")",
           ("dicepp_gamma",), uses_sam=True),
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
    Method("sam2_zeroshot", "nnUNetTrainerSAM2", "nnUNetTrainerSAM2ZeroShot",
           "zero-shot SAM 2 (no training: calib_train only predicts)", uses_sam=True, uses_sam2=True),
    Method("sam2ft", "nnUNetTrainerSAM2", "nnUNetTrainerSAM2FT",
           "SAM 2 with its mask decoder fine-tuned on imperfect prompts (AdamW, Dice + BCE)", uses_sam=True,
           uses_sam2=True),
    Method("safeclick", "nnUNetTrainerSAM2", "nnUNetTrainerSafeClick",
           "SafeClick: SAM 2's decoder + expert layers E1/E2 + consensus reasoning layer, trained on imperfect "
           "prompts", uses_sam=True, uses_sam2=True),
    Method("safeclick_no_e1", "nnUNetTrainerSAM2", "nnUNetTrainerSafeClickNoE1",
           "ablation: SafeClick without E1 (same as safeclick --no-e1)", uses_sam=True, uses_sam2=True),
    Method("safeclick_no_e2", "nnUNetTrainerSAM2", "nnUNetTrainerSafeClickNoE2",
           "ablation: SafeClick without E2 (same as safeclick --no-e2)", uses_sam=True, uses_sam2=True),
    Method("safeclick_no_crl", "nnUNetTrainerSAM2", "nnUNetTrainerSafeClickNoCRL",
           "ablation: SafeClick without the CRL (same as safeclick --no-crl)", uses_sam=True, uses_sam2=True),
)}

SAFECLICK_ABLATIONS = {"e1": "safeclick_no_e1", "e2": "safeclick_no_e2", "crl": "safeclick_no_crl"}


def safeclick_variant(method: str, removed: list) -> str:
    """The method that ``calib_train METHOD --no-e1`` (etc.) trains: one ablation of safeclick at a time."""
    if not removed:
        return method
    flags = ", ".join(f"--no-{r}" for r in removed)
    if method != "safeclick":
        raise CalibnetError(f"{flags} ablate parts of safeclick, not {method}.")
    if len(removed) > 1:
        raise CalibnetError(f"{flags}: one ablation at a time (the paper's Table 3); train each separately.")
    return SAFECLICK_ABLATIONS[removed[0]]


def get_method(alias: str) -> Method:
    if alias not in METHODS:
        raise CalibnetError(f"unknown method {alias!r}; choose from {', '.join(METHODS)} (calib_train --list).")
    return METHODS[alias]


def method_of_trainer(class_name: str) -> Method:
    for method in METHODS.values():
        if method.class_name == class_name:
            return method
    raise CalibnetError(f"checkpoint was written by trainer {class_name}, which calibnet does not know.")
