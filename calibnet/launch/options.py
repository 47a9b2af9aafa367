"""What a calib_train request may set, grouped as ``calib_train --help`` groups its flags, the check of each
group against the flags the method declares (``calibnet.methods``) with the messages calib_train prints, and
what a request produced (TrainResult).

Every field left at None means "not given": the method's or the trainer's default applies. All checks run
before anything is written.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from calibnet.errors import CalibnetError, UsageError
from calibnet.losses import FIP_ESTIMATORS
from calibnet.methods import LOSS_FLAGS, METHODS, NETWORK_FLAGS, SAM_PROMPTS, Method
from calibnet.runs import DEFAULT_SEED, RunSpec


def _given(options) -> dict:
    return {k: v for k, v in asdict(options).items() if v is not None}


@dataclass(frozen=True)
class LossOptions:
    """Loss weights and shapes (--lambda-fip, ...); each method takes those in its ``loss_options``."""
    lambda_fip: float | None = None
    fip_estimator: str | None = None  # one of losses.FIP_ESTIMATORS
    lambda_cmp: float | None = None
    cmp_tau: float | None = None
    cmp_gamma: float | None = None
    focal_gamma: float | None = None
    dicepp_gamma: float | None = None

    def given(self) -> dict:
        return _given(self)


@dataclass(frozen=True)
class BackboneOptions:
    """SAM (--sam-model, --sam-checkpoint) or SAM 2 (--sam2-*) backbone and the binary target (--target)."""
    sam_model: str | None = None
    sam_checkpoint: str | None = None
    sam2_model: str | None = None
    sam2_checkpoint: str | None = None
    sam2_image_size: int | None = None
    target_label: int | None = None
    sam_prompt: str | None = None  # --sam-prompt points|box: the per-slice prompts of a SAM-FT method

    def given(self) -> dict:
        return _given(self)


@dataclass(frozen=True)
class NetworkOptions:
    """Options of the network a method builds (medsam_u: adapters, UGMP, UGPA), recorded in calibnet_run.json;
    the keys are those of ``methods.NETWORK_FLAGS``."""
    adapter_blocks: str | None = None
    adapter_ratio: float | None = None
    n_boxes: int | None = None
    sigma: float | None = None
    top_k: int | None = None
    compare_on: str | None = None
    ugpa: bool | None = None  # False: UGMP only (--no-ugpa)

    def given(self) -> dict:
        return _given(self)


@dataclass(frozen=True)
class HeadOptions:
    """How a confidence head is trained (calib_train ... confidence_head --base METHOD)."""
    base: str | None = None  # the finished run whose frozen network the head reads
    adversarial: bool = True
    warmup_batches: int | None = None  # default: the paper's 100
    patience: int | None = None  # default: the paper's 20 epochs

    def given(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None and (k != "adversarial" or not v)}


@dataclass(frozen=True)
class PredictionOptions:
    """How calib_train predicts the fold's val and test cases after training."""
    use_mirroring: bool = True  # False: --disable-tta
    mc_samples: tuple = ()  # MC-dropout sample counts N (nnunet_dropout)
    prompt_settings: tuple = ()  # prompt-quality settings predicted in addition (SAM methods)
    predict_only: bool = False  # no training: (re)predict a trained run


@dataclass(frozen=True)
class TrainRequest:
    """Everything ``calib_train DATASET CONFIGURATION METHOD FOLD [flags]`` asks for."""
    dataset_id: int
    configuration: str
    method: str
    fold: int
    split: str = "loco"
    seed: int = DEFAULT_SEED
    epochs: int | None = None
    iterations_per_epoch: int | None = None
    device: str | None = None  # default: cuda when available
    num_workers: int | None = None  # nnU-Net's data-augmentation processes for this training
    num_gpus: int = 1  # > 1: train with nnU-Net's DDP, one process per GPU (calibnet.launch.ddp)
    continue_training: bool = False
    overwrite: bool = False  # retrain a finished (or interrupted) run afresh, replacing it once the new one has trained
    ablations: tuple = ()  # parts removed from the method (--no-e1: ("e1",)), one at a time
    on_backbone: str | None = None  # --backbone: the method's variant on this backbone (safeclick on litemedsam)
    loss: LossOptions = field(default_factory=LossOptions)
    backbone: BackboneOptions = field(default_factory=BackboneOptions)
    network: NetworkOptions = field(default_factory=NetworkOptions)
    head: HeadOptions = field(default_factory=HeadOptions)
    prediction: PredictionOptions = field(default_factory=PredictionOptions)

    @property
    def spec(self) -> RunSpec:
        return RunSpec.of(self)


def _takers(options: tuple, declared) -> str:
    return ", ".join(m.alias for m in METHODS.values() if set(options) <= set(declared(m)))


def check_loss_options(method: Method, loss: LossOptions) -> dict:
    """The given loss options (floats; --fip-estimator a name); refuses those the method does not take and values out of range."""
    checked = {}
    for name, value in loss.given().items():
        if name not in method.loss_options:
            raise CalibnetError(f"{LOSS_FLAGS[name]} does not apply to method {method.alias}; it takes "
                                f"{', '.join(LOSS_FLAGS[o] for o in method.loss_options) or 'no loss flags'}.")
        if name == "fip_estimator":
            if value not in FIP_ESTIMATORS:
                raise CalibnetError(f"--fip-estimator {value!r}: choose {' or '.join(FIP_ESTIMATORS)}.")
            checked[name] = value
            continue
        value = float(value)
        strictly_positive = name.endswith("gamma") and name != "focal_gamma"
        if not np.isfinite(value) or value < 0 or (value == 0 and strictly_positive):
            raise CalibnetError(f"{LOSS_FLAGS[name]} {value} is out of range: give a finite value "
                                f"{'> 0' if strictly_positive else '>= 0'}.")
        checked[name] = value
    return checked


def check_sam_prompt(method: Method, sam_prompt: str | None) -> str | None:
    """``--sam-prompt points|box``: what the run records as its ``"sam_prompt"`` — the choice of a SAM-FT method
    where it differs from the method's own prompts, else None (``box`` on vanilla_sam or medsam_u, which always use
    boxes, and ``points`` on SAM-FT change nothing); refused on other methods."""
    if sam_prompt is None:
        return None
    if sam_prompt not in SAM_PROMPTS:
        raise CalibnetError(f"--sam-prompt {sam_prompt!r}: choose {' or '.join(SAM_PROMPTS)}.")
    if sam_prompt not in method.sam_prompts:
        why = ("it always prompts with the ground-truth box" if method.sam_prompts else
               "SAM 2 and imperfect-prompt methods keep their own prompts" if method.uses_sam else
               "it takes no SAM prompts")
        choosers = ", ".join(m.alias for m in METHODS.values() if m.chooses_sam_prompt)
        raise CalibnetError(f"--sam-prompt {sam_prompt} does not apply to {method.alias} ({why}); it chooses the "
                            f"prompts of the SAM-FT methods: {choosers}.")
    return None if sam_prompt == method.default_sam_prompt else sam_prompt


def check_recorded_sam_prompt(method: Method, record: dict | None, sam_prompt: str | None, predict_only: bool) -> None:
    """``--continue`` and ``--predict-only`` keep the prompts a run was trained with (``record``, its
    calibnet_run.json; None when it has none yet): refuse a --sam-prompt that differs, and, continuing, a missing
    one where the run was trained with --sam-prompt."""
    check_sam_prompt(method, sam_prompt)
    if record is None or not method.chooses_sam_prompt or (predict_only and sam_prompt is None):
        return
    recorded = method.sam_prompt_of(record)
    if (sam_prompt or method.default_sam_prompt) != recorded:
        flag = "--predict-only" if predict_only else "--continue"
        fix = "leave --sam-prompt out" if predict_only else f"give --sam-prompt {recorded}"
        raise CalibnetError(f"{flag} keeps the prompts the run was trained with (--sam-prompt {recorded}, in its "
                            f"calibnet_run.json): {fix}, or train afresh (without {flag}) to change them.")


def check_backbone_options(method: Method, backbone: BackboneOptions) -> None:
    """Refuse backbone flags of another family (or any, on a method without a SAM backbone), and --sam-prompt
    where it does not apply."""
    check_sam_prompt(method, backbone.sam_prompt)
    refused = [k for k in backbone.given() if k not in method.backbone_options and k != "sam_prompt"]
    if not refused:
        return
    if method.backbone == "none":
        raise CalibnetError(f"--sam-model, --sam-checkpoint, --sam2-* and --target apply to SAM methods, not "
                            f"{method.alias}.")
    if method.backbone == "sam2":
        other = dict(method.variants).get("litemedsam")
        hint = f" (or --backbone litemedsam: {other})." if other else "."
        raise CalibnetError(f"{method.alias} runs on SAM 2: use --sam2-model/--sam2-checkpoint, not "
                            f"--sam-model/--sam-checkpoint{hint}")
    raise CalibnetError(f"--sam2-model, --sam2-checkpoint and --sam2-image-size apply to SAM 2 methods "
                        f"(sam2_zeroshot, sam2ft, safeclick), not {method.alias}.")


def check_network_options(method: Method, network: NetworkOptions) -> dict:
    """The given network options; refuses them all, by flag, unless the method takes each."""
    given = network.given()
    if any(k not in method.network_options for k in given):
        flags = ", ".join(NETWORK_FLAGS[k] for k in given)
        raise CalibnetError(f"{flags} apply to {_takers(tuple(given), lambda m: m.network_options)}, "
                            f"not {method.alias}.")
    return given


def check_head_options(method: Method, head: HeadOptions) -> None:
    """A head method needs --base; the head flags apply to head methods only (usage errors)."""
    if method.trains_head and head.base is None:
        raise UsageError(f"{method.alias} needs --base METHOD, the trained run whose network it reads.")
    if not method.trains_head and head.given():
        raise UsageError("--base, --no-adversarial, --warmup-batches and --patience apply to confidence_head.")


def check_prediction_options(request: TrainRequest) -> None:
    """--no-ugpa without training changes prompt-setting predictions only, so it needs --prompts."""
    prediction = request.prediction
    if prediction.predict_only and request.network.ugpa is False and not prediction.prompt_settings:
        raise UsageError("--no-ugpa with --predict-only needs --prompts SETTING (the run's own predictions "
                         "follow its training options).")


def ddp_methods() -> list:
    """The methods whose trainers train with nnU-Net's DDP (``supports_ddp``). SAM trainers never do (they build
    their network in their own initialize()), so their modules are not imported for this list."""
    return [m.alias for m in METHODS.values() if not m.uses_sam and m.trainer_class().supports_ddp]


def check_num_gpus(method: Method, num_gpus: int, device: str | None = None, predict_only: bool = False) -> None:
    """``--num-gpus N`` > 1 trains with nnU-Net's DDP: only on CUDA, only for training, only for a method whose
    trainer ``supports_ddp`` (imported here, when N > 1). Whether N CUDA devices are visible is checked where
    the training runs (``calibnet.launch.ddp.check_cuda_devices``)."""
    if num_gpus == 1:
        return
    flag = f"--num-gpus {num_gpus}"
    if num_gpus < 1:
        raise UsageError(f"{flag}: give 1 or more GPUs.")
    if predict_only:
        raise UsageError(f"{flag} applies to training; --predict-only predicts on one device: drop --num-gpus.")
    if device == "cpu":
        raise UsageError(f"{flag} trains with nnU-Net's DDP on CUDA devices, not with --device cpu: drop one of "
                         f"the two.")
    trainer = method.trainer_class()
    if trainer.supports_ddp and trainer.trains:
        return
    reason = trainer.no_ddp_reason if trainer.trains else "it has nothing to train (zero-shot)."
    raise CalibnetError(f"{flag}: {method.alias} does not train on several GPUs: {reason} Train it with "
                        f"--num-gpus 1; methods that train with nnU-Net's DDP: {', '.join(ddp_methods())}.")


@dataclass
class TrainResult:
    """What a calib_train request produced."""
    method: str  # the method trained (a SafeClick ablation or backbone variant when --no-e1, --backbone asked)
    folder: Path | None  # the run folder; of a confidence head: the head's folder (None with --predict-only)
    trained: bool  # False with --predict-only
    # prediction set (None: the run's own prompts, else the prompt-quality setting) -> {"val": folder, "test": ...}
    predictions: dict = field(default_factory=dict)
