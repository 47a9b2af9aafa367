"""The method registry as declared data: each alias users type (``calib_train --list``) with its trainer
class, backbone family, whether it trains a network or a confidence head, and the calib_train flags it takes.

launch/ accepts or refuses flags from these fields, inference and evaluation find a run's method by its
trainer class; nothing else keeps a list of methods. Trainer classes are imported by name, on demand, so
this module sits below the stages without importing them.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

from calibnet.errors import CalibnetError

BACKBONES = ("none", "sam", "sam2")  # nnU-Net's own network | segment_anything (SAM, MedSAM) | the sam2 package
# calib_train --backbone NAME -> the family it names (litemedsam: the SAM family, whose default is LiteMedSAM)
BACKBONE_NAMES = {"sam2": "sam2", "litemedsam": "sam"}

# option name (a field of the launch/ option dataclasses) -> calib_train flag
LOSS_FLAGS = {"lambda_fip": "--lambda-fip", "fip_estimator": "--fip-estimator", "lambda_cmp": "--lambda-cmp", "cmp_tau": "--cmp-tau",
              "cmp_gamma": "--cmp-gamma", "focal_gamma": "--focal-gamma", "dicepp_gamma": "--dicepp-gamma"}
BACKBONE_FLAGS = {
    "none": {},
    "sam": {"sam_model": "--sam-model", "sam_checkpoint": "--sam-checkpoint", "target_label": "--target"},
    "sam2": {"sam2_model": "--sam2-model", "sam2_checkpoint": "--sam2-checkpoint",
             "sam2_image_size": "--sam2-image-size", "target_label": "--target"},
}
NETWORK_FLAGS = {"adapter_blocks": "--adapter-blocks", "adapter_ratio": "--adapter-ratio", "n_boxes": "--ugmp-boxes",
                 "sigma": "--ugmp-sigma", "top_k": "--ugpa-k", "compare_on": "--ugpa-compare", "ugpa": "--no-ugpa"}
# calib_train --sam-prompt: the per-slice prompts a SAM-FT method trains and predicts with (CalSAM's points: the mask's
# centroid and a distant background point; box: the slice's ground-truth box, vanilla SAM's prompt)
SAM_PROMPTS = ("points", "box")
COMPARED_AS = ("baseline", "proposed", "ablation")
HEAD_FLAGS = {"base": "--base", "adversarial": "--no-adversarial", "warmup_batches": "--warmup-batches",
              "patience": "--patience"}

_FIP_LOSS = ("lambda_fip", "fip_estimator")
_CALUNET_LOSS = (*_FIP_LOSS, "lambda_cmp", "cmp_tau", "cmp_gamma")
_CMP_LOSS = ("lambda_cmp", "cmp_tau", "cmp_gamma")
_MEDSAM_U_NETWORK = tuple(NETWORK_FLAGS)


@dataclass(frozen=True)
class Method:
    """One method: what ``calib_train ALIAS`` trains and which of calib_train's flags it takes."""
    alias: str
    module: str  # under calibnet.trainers
    class_name: str
    summary: str
    loss_options: tuple = ()  # keys of LOSS_FLAGS: trainer attributes that calib_train's loss flags set
    backbone: str = "none"  # one of BACKBONES; "sam" and "sam2" methods segment slice-wise one binary target
    trains_head: bool = False  # trains a confidence head on a finished base run (HEAD_FLAGS) instead of a network
    network_options: tuple = ()  # keys of NETWORK_FLAGS: options of the network it builds (medsam_u)
    ablations: tuple = ()  # (part, alias) pairs: calib_train ALIAS --no-PART trains that ablation instead
    box_prompt: bool = False  # a SAM method prompted with the slice's ground-truth box (vanilla SAM; MedSAM-U jitters it)
    variants: tuple = ()  # (backbone name, alias) pairs: calib_train ALIAS --backbone NAME trains that alias instead
    # values of calib_train --sam-prompt it takes: SAM_PROMPTS (the SAM-FT family, whose run records the choice), or
    # its own prompts alone (a no-op: vanilla_sam and medsam_u always use boxes); () refuses the flag
    sam_prompts: tuple = ()
    # what significance tables test it as (COMPARED_AS): the strongest "baseline" present is the method every other
    # one is tested against; a "proposed" method (a paper's own) or an "ablation" (one part of it) never is
    compared_as: str = "baseline"

    def __post_init__(self):
        unknown = ([self.backbone] if self.backbone not in BACKBONES else []) + \
            [o for o in self.loss_options if o not in LOSS_FLAGS] + \
            [o for o in self.network_options if o not in NETWORK_FLAGS] + \
            [name for name, _ in self.variants if name not in BACKBONE_NAMES] + \
            [p for p in self.sam_prompts if p not in SAM_PROMPTS or self.backbone != "sam"] + \
            ([self.compared_as] if self.compared_as not in COMPARED_AS else [])
        if unknown or (self.trains_head and self.backbone != "none"):
            raise ValueError(f"method {self.alias}: undeclared backbone or options {unknown}")

    @property
    def uses_sam(self) -> bool:
        """A slice-wise SAM or SAM 2 method (binary target, prompts)."""
        return self.backbone != "none"

    @property
    def uses_sam2(self) -> bool:
        """Its backbone comes from the sam2 package (--sam2-* flags)."""
        return self.backbone == "sam2"

    @property
    def chooses_sam_prompt(self) -> bool:
        """``calib_train --sam-prompt points|box`` chooses the prompts it trains and predicts with (SAM-FT family)."""
        return len(self.sam_prompts) > 1

    @property
    def default_sam_prompt(self) -> str | None:
        """Its own per-slice prompts: ``box`` (vanilla SAM, MedSAM-U), ``points`` (other SAM methods), None."""
        return None if not self.uses_sam else "box" if self.box_prompt else "points"

    def sam_prompt_of(self, record: dict) -> str | None:
        """The per-slice prompts a run of this method trained and predicts with: its calibnet_run.json's
        ``"sam_prompt"`` (calib_train --sam-prompt; recorded only where it differs from the method's own), else the
        method's own; None for a method without SAM prompts."""
        return (record.get("sam_prompt") or self.default_sam_prompt) if self.uses_sam else None

    def own_prompts_of(self, record: dict) -> str:
        """What a run's own predictions are prompted with: ``none``, ``default`` (CalSAM's points) or ``B100`` (the
        slice's ground-truth box, as vanilla SAM's; a SAM-FT run trained with --sam-prompt box)."""
        prompt = self.sam_prompt_of(record)
        return "none" if prompt is None else "B100" if prompt == "box" else "default"

    @property
    def own_prompts(self) -> str:
        """What its own predictions are prompted with by default: ``none``, ``default`` (CalSAM's points) or
        ``B100``; a run's own: :meth:`own_prompts_of`."""
        return self.own_prompts_of({})

    @property
    def backbone_options(self) -> tuple:
        """Keys of BACKBONE_FLAGS it takes: the flags of its backbone family."""
        return tuple(BACKBONE_FLAGS[self.backbone])

    @property
    def head_options(self) -> tuple:
        """Keys of HEAD_FLAGS it takes."""
        return tuple(HEAD_FLAGS) if self.trains_head else ()

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
           "nnU-Net + 0.3·FIP on the encoder skips + 0.5·CMP on the final softmax", _CALUNET_LOSS,
           compared_as="proposed"),
    Method("unet_fip", "nnUNetTrainerCalUNet", "nnUNetTrainerUNetFIP", "ablation: nnU-Net + 0.3·FIP",
           _FIP_LOSS, compared_as="ablation"),
    Method("unet_cmp", "nnUNetTrainerCalUNet", "nnUNetTrainerUNetCMP", "ablation: nnU-Net + 0.5·CMP", _CMP_LOSS,
           compared_as="ablation"),
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
           "SAM-FT: frozen SAM encoders, mask decoder trained with Dice + BCE, point prompts per slice "
           "(--sam-prompt box: the slice's ground-truth box)",
           backbone="sam", sam_prompts=SAM_PROMPTS),
    Method("samft_focal", "nnUNetTrainerSAM", "nnUNetTrainerSAMFTFocal",
           "SAM-FT with Dice + focal loss (γ = 2) instead of Dice + BCE (CalSAM Table 3's \"+ Focal Loss\")",
           ("focal_gamma",), backbone="sam", sam_prompts=SAM_PROMPTS),
    Method("samft_dicepp", "nnUNetTrainerSAM", "nnUNetTrainerSAMFTDicePP",
           "SAM-FT trained with the Dice++ loss (γ = 2) instead of Dice + BCE (CalSAM Table 3's \"+ Dice++\")",
           ("dicepp_gamma",), backbone="sam", sam_prompts=SAM_PROMPTS),
    Method("calsam", "nnUNetTrainerSAM", "nnUNetTrainerCalSAM",
           "CalSAM: SAM-FT + 0.3·FIP on the frozen embeddings + 0.5·CMP", _CALUNET_LOSS, backbone="sam",
           sam_prompts=SAM_PROMPTS, compared_as="proposed"),
    Method("sam_fip", "nnUNetTrainerSAM", "nnUNetTrainerSAMFIP", "ablation: SAM-FT + 0.3·FIP", _FIP_LOSS,
           backbone="sam", sam_prompts=SAM_PROMPTS, compared_as="ablation"),
    Method("sam_cmp", "nnUNetTrainerSAM", "nnUNetTrainerSAMCMP", "ablation: SAM-FT + 0.5·CMP", _CMP_LOSS,
           backbone="sam", sam_prompts=SAM_PROMPTS, compared_as="ablation"),
    Method("vanilla_sam", "nnUNetTrainerSAM", "nnUNetTrainerVanillaSAM",
           "zero-shot SAM with the slice's ground-truth box (no training: calib_train only predicts)",
           backbone="sam", box_prompt=True, sam_prompts=("box",)),
    Method("medsam_u", "nnUNetTrainerMedSAMU", "nnUNetTrainerMedSAMU",
           "MedSAM-U: adapters in the image encoder + prompt encoder trained (focal + Dice, points and jittered "
           "boxes); UGMP + UGPA at prediction", backbone="sam", network_options=_MEDSAM_U_NETWORK,
           box_prompt=True, sam_prompts=("box",), compared_as="proposed"),
    Method("medsam", "nnUNetTrainerSAM", "nnUNetTrainerMedSAM",
           "SAM-FT from a MedSAM checkpoint (--sam-checkpoint medsam_vit_b.pth)", backbone="sam",
           sam_prompts=SAM_PROMPTS),
    Method("sam2_zeroshot", "nnUNetTrainerSAM2", "nnUNetTrainerSAM2ZeroShot",
           "zero-shot SAM 2 (no training: calib_train only predicts)", backbone="sam2"),
    Method("sam2ft", "nnUNetTrainerSAM2", "nnUNetTrainerSAM2FT",
           "SAM 2 with its mask decoder fine-tuned on imperfect prompts (AdamW, Dice + BCE; --backbone litemedsam: "
           "samft_imperfect)", backbone="sam2", variants=(("litemedsam", "samft_imperfect"),)),
    Method("safeclick", "nnUNetTrainerSAM2", "nnUNetTrainerSafeClick",
           "SafeClick: SAM 2's decoder + expert layers E1/E2 + consensus reasoning layer, trained on imperfect "
           "prompts (--backbone litemedsam: safeclick_lite)", backbone="sam2",
           ablations=(("e1", "safeclick_no_e1"), ("e2", "safeclick_no_e2"), ("crl", "safeclick_no_crl")),
           variants=(("litemedsam", "safeclick_lite"),), compared_as="proposed"),
    Method("safeclick_no_e1", "nnUNetTrainerSAM2", "nnUNetTrainerSafeClickNoE1",
           "ablation: SafeClick without E1 (same as safeclick --no-e1)", backbone="sam2", compared_as="ablation"),
    Method("safeclick_no_e2", "nnUNetTrainerSAM2", "nnUNetTrainerSafeClickNoE2",
           "ablation: SafeClick without E2 (same as safeclick --no-e2)", backbone="sam2", compared_as="ablation"),
    Method("safeclick_no_crl", "nnUNetTrainerSAM2", "nnUNetTrainerSafeClickNoCRL",
           "ablation: SafeClick without the CRL (same as safeclick --no-crl)", backbone="sam2", compared_as="ablation"),
    Method("samft_imperfect", "nnUNetTrainerSafeClickLite", "nnUNetTrainerSAMFTImperfect",
           "SAM-FT on imperfect prompts with SafeClick's recipe (AdamW): the baseline of safeclick_lite",
           backbone="sam", variants=(("sam2", "sam2ft"),)),
    Method("safeclick_lite", "nnUNetTrainerSafeClickLite", "nnUNetTrainerSafeClickLite",
           "SafeClick's plug-in on LiteMedSAM's decoder (pretrained; --sam-model/--sam-checkpoint for another SAM), "
           "trained on imperfect prompts; no paper has this", backbone="sam",
           ablations=(("e1", "safeclick_lite_no_e1"), ("e2", "safeclick_lite_no_e2"),
                      ("crl", "safeclick_lite_no_crl")),
           variants=(("sam2", "safeclick"),), compared_as="proposed"),
    Method("safeclick_lite_no_e1", "nnUNetTrainerSafeClickLite", "nnUNetTrainerSafeClickLiteNoE1",
           "ablation: safeclick_lite without E1 (same as safeclick --backbone litemedsam --no-e1)", backbone="sam",
           compared_as="ablation"),
    Method("safeclick_lite_no_e2", "nnUNetTrainerSafeClickLite", "nnUNetTrainerSafeClickLiteNoE2",
           "ablation: safeclick_lite without E2 (same as safeclick --backbone litemedsam --no-e2)", backbone="sam",
           compared_as="ablation"),
    Method("safeclick_lite_no_crl", "nnUNetTrainerSafeClickLite", "nnUNetTrainerSafeClickLiteNoCRL",
           "ablation: safeclick_lite without the CRL (same as safeclick --backbone litemedsam --no-crl)",
           backbone="sam", compared_as="ablation"),
)}

SAFECLICK_ABLATIONS = dict(METHODS["safeclick"].ablations)


def safeclick_variant(method: str, removed: list) -> str:
    """The method that ``calib_train METHOD --no-e1`` (etc.) trains: one ablation of safeclick at a time."""
    if not removed:
        return method
    flags = ", ".join(f"--no-{r}" for r in removed)
    ablations = dict(METHODS[method].ablations) if method in METHODS else {}
    if not ablations:
        raise CalibnetError(f"{flags} ablate parts of safeclick, not {method}.")
    if len(removed) > 1:
        raise CalibnetError(f"{flags}: one ablation at a time (the paper's Table 3); train each separately.")
    return ablations[removed[0]]


def backbone_variant(method: str, backbone: str | None) -> str:
    """The method that ``calib_train METHOD --backbone NAME`` trains: METHOD itself when it runs on that backbone
    already, else its declared variant on it (safeclick --backbone litemedsam: safeclick_lite; sam2ft
    --backbone litemedsam: samft_imperfect, its baseline)."""
    if backbone is None:
        return method
    if backbone not in BACKBONE_NAMES:
        raise CalibnetError(f"unknown --backbone {backbone!r}; choose from {', '.join(BACKBONE_NAMES)}.")
    declared = get_method(method)
    if declared.backbone == BACKBONE_NAMES[backbone]:
        return method
    variants = dict(declared.variants)
    if backbone not in variants:
        takers = ", ".join(m.alias for m in METHODS.values() if m.variants)
        raise CalibnetError(f"--backbone {backbone}: {method} has no variant on it (--backbone applies to {takers}).")
    return variants[backbone]


def method_variant(method: str, backbone: str | None = None, removed: tuple = ()) -> str:
    """The method ``calib_train METHOD [--backbone NAME] [--no-PART]`` trains: METHOD's variant on the backbone,
    then one ablation of that (safeclick --backbone litemedsam --no-e1: safeclick_lite_no_e1)."""
    return safeclick_variant(backbone_variant(method, backbone), list(removed))


def get_method(alias: str) -> Method:
    if alias not in METHODS:
        raise CalibnetError(f"unknown method {alias!r}; choose from {', '.join(METHODS)} (calib_train --list).")
    return METHODS[alias]


def method_of_trainer(class_name: str) -> Method:
    for method in METHODS.values():
        if method.class_name == class_name:
            return method
    raise CalibnetError(f"checkpoint was written by trainer {class_name}, which calibnet does not know.")
