"""calib_train as a library call: one method trained on one fold of one split family with one seed,
through nnU-Net's own training loop.

Each run has its own folder under nnU-Net's results tree:
``$nnUNet_results/DatasetXXX/<Trainer>__CalibPlans__<configuration>/<split>_fold<F>_seed<S>/``
holding nnU-Net's checkpoints, log and progress plot plus ``calibnet_run.json``.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from calibnet.errors import CalibnetError
from calibnet.planners.splits import describe_fold, get_fold, load_calib_splits
from calibnet.launch.options import (BackboneOptions, HeadOptions, LossOptions, NetworkOptions, check_backbone_options,
                                     check_head_options, check_loss_options, check_network_options, check_num_gpus,
                                     check_recorded_sam_prompt, check_sam_prompt)
from calibnet.launch.interruption import workers_die_with_parent
from calibnet.methods import METHODS, get_method
from calibnet.runs import (CALIB_PLANS_NAME, RUN_FILENAME, RunRecord, RunSpec, finished_folds, model_checkpoint,
                           read_run, resume_checkpoint, run_folder, run_state, write_run)



def register_external_trainers() -> None:
    """Let nnU-Net find calibnet's trainers by class name (used when it loads a trainer by name)."""
    package_parent = str(Path(__file__).resolve().parents[2])
    current = os.environ.get("nnUNet_extTrainer", "")
    if package_parent not in current.split(os.pathsep):
        os.environ["nnUNet_extTrainer"] = os.pathsep.join(p for p in (current, package_parent) if p)


def find_preprocessed_dataset(preprocessed_root: Path, dataset_id: int) -> Path:
    matches = sorted(p for p in Path(preprocessed_root).glob(f"Dataset{int(dataset_id):03d}_*") if p.is_dir())
    if len(matches) != 1 or not (matches[0] / f"{CALIB_PLANS_NAME}.json").is_file():
        raise CalibnetError(f"no {CALIB_PLANS_NAME}.json for dataset {dataset_id} in {preprocessed_root}; run "
                            f"calib_plan_and_preprocess -d {dataset_id} first.")
    return matches[0]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def _set_loss_options(trainer, method, checked: dict) -> dict:
    """Set the checked loss options on the trainer; returns every loss option of the method as it trains."""
    for name, value in checked.items():
        setattr(trainer, name, value)
    return {name: getattr(trainer, name) if name == "fip_estimator" else float(getattr(trainer, name))
            for name in method.loss_options}


def _stop_dataloaders(trainer) -> None:
    for name in ("dataloader_train", "dataloader_val"):
        loader = getattr(trainer, name, None)
        if loader is not None and hasattr(loader, "_finish"):
            loader._finish()


def locate_run(spec: RunSpec, preprocessed_root: Path, results_root: Path) -> Path:
    """The run folder of ``spec`` (which need not exist yet); checks method, dataset, split and fold."""
    method = get_method(spec.method)
    dataset_folder = find_preprocessed_dataset(preprocessed_root, spec.dataset_id)
    get_fold(load_calib_splits(dataset_folder), spec.split, spec.fold, where=dataset_folder / "calib_splits.json")
    return run_folder(results_root, dataset_folder.name, method.class_name, spec)


def locate_fold_runs(spec: RunSpec, folds, preprocessed_root: Path, results_root: Path) -> dict:
    """{fold: run folder} of ``spec``'s method, configuration, split and seed for ``folds`` (fold numbers, or
    ``"all"``: every fold with a finished run), refusing a fold without a finished run (``calibnet_run.json``)
    with the command that trains it."""
    method = get_method(spec.method)
    if folds == "all":
        dataset_folder = find_preprocessed_dataset(preprocessed_root, spec.dataset_id)
        folds = finished_folds(results_root, dataset_folder.name, method.class_name, spec)
        if not folds:
            raise CalibnetError(f"-f all: {spec.method} ({spec.configuration}, {spec.split}, seed {spec.seed}) has no "
                                f"finished run in {results_root / dataset_folder.name}; train one with: "
                                f"{replace(spec, fold=0).training_command}")
    folders = {}
    for fold in folds:
        fold_spec = replace(spec, fold=int(fold))
        folder = locate_run(fold_spec, preprocessed_root, results_root)
        if not (folder / RUN_FILENAME).is_file():
            raise CalibnetError(f"fold {fold} of {spec.method} ({spec.configuration}, {spec.split}, seed {spec.seed}) "
                                f"has no finished run: {folder / RUN_FILENAME} is missing; train it with: "
                                f"{fold_spec.training_command}")
        folders[int(fold)] = folder
    return dict(sorted(folders.items()))


def prepare_trainer(spec: RunSpec, preprocessed_root: Path, results_root: Path, device: str | None = None,
                    continue_training: bool = False, folder: Path | None = None):
    """Build the nnU-Net trainer of ``spec`` (checks split, fold, plans and configuration first); it writes
    to the run folder of ``spec`` unless ``folder`` is given."""
    method = get_method(spec.method)
    dataset_folder = find_preprocessed_dataset(preprocessed_root, spec.dataset_id)
    plans = json.loads((dataset_folder / f"{CALIB_PLANS_NAME}.json").read_text())
    if spec.configuration not in plans["configurations"]:
        raise CalibnetError(f"configuration {spec.configuration} is not in {dataset_folder / (CALIB_PLANS_NAME + '.json')}; "
                            f"available: {', '.join(plans['configurations'])}.")
    data_identifier = plans["configurations"][spec.configuration].get("data_identifier",
                                                                     f"{CALIB_PLANS_NAME}_{spec.configuration}")
    if not (dataset_folder / data_identifier).is_dir():
        raise CalibnetError(f"{dataset_folder / data_identifier} is missing: preprocess it with "
                            f"calib_plan_and_preprocess -d {spec.dataset_id} -c {spec.configuration}.")
    fold = get_fold(load_calib_splits(dataset_folder), spec.split, spec.fold,
                    where=dataset_folder / "calib_splits.json")
    device = device or default_device()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CalibnetError("--device cuda was asked for but no CUDA device is available; use --device cpu.")
    register_external_trainers()
    seed_everything(spec.seed)
    plans["continue_training"] = continue_training
    dataset_json = json.loads((dataset_folder / "dataset.json").read_text())
    trainer = method.trainer_class()(plans, spec.configuration, spec.fold, dataset_json, device=torch.device(device))
    trainer.split_family, trainer.seed = spec.split, spec.seed
    folder = Path(folder) if folder else run_folder(results_root, dataset_folder.name, trainer.__class__.__name__,
                                                    spec)
    trainer.use_run_folder(folder)
    return trainer, method, dataset_folder.name, describe_fold(spec.split, fold), folder


def _resolve_backbone(method, backbone: BackboneOptions):
    """(config, warning) of the SAM or SAM 2 backbone the flags describe, None for other methods; refuses
    flags of the other family (checked before anything is written)."""
    from calibnet.networks.sam2_backbone import resolve_sam2_config
    from calibnet.networks.sam_backbone import resolve_sam_config

    check_backbone_options(method, backbone)
    if method.backbone == "none":
        return None
    if method.backbone == "sam2":
        return resolve_sam2_config(backbone.sam2_model, backbone.sam2_checkpoint, backbone.sam2_image_size)
    return resolve_sam_config(backbone.sam_model, backbone.sam_checkpoint)


def _configure_sam(trainer, method, spec: RunSpec, backbone, target_label, log,
                   network_options: dict | None = None, sam_prompt: str | None = None) -> dict:
    """Backbone, target, prompt seed and prompts (``sam_prompt``: --sam-prompt where it differs from the method's
    own) of a SAM method; returns what calibnet_run.json records."""
    from calibnet.networks.sam_backbone import SamConfig, sam_image_channel

    if backbone is None:
        return {}
    config, warning = backbone
    if trainer.requires_checkpoint and not config.pretrained:
        raise CalibnetError(f"{method.alias} fine-tunes {trainer.requires_checkpoint} weights, not a random SAM: "
                            f"leave --sam-model out for the packaged LiteMedSAM, or download medsam_vit_b.pth (the "
                            f"MedSAM release) and pass --sam-checkpoint PATH or set CALIBNET_SAM_CHECKPOINT.")
    if warning:
        log(f"warning: {warning}")
    labels = [v for k, v in trainer.dataset_json["labels"].items() if k != "background"]
    label_values = sorted({x for v in labels for x in (v if isinstance(v, list) else [v])})
    if target_label is not None and target_label not in label_values:
        raise CalibnetError(f"--target {target_label} is not a label value of this dataset; values: {label_values}.")
    if target_label is None and any(isinstance(v, list) for v in labels):
        raise CalibnetError("SAM methods train one binary model: pass --target with a label value for this "
                            "region-based dataset (e.g. --target 1), or leave it out on label datasets for the "
                            "union of all foreground.")
    if isinstance(config, SamConfig):  # a grayscale-trained SAM reads one channel (recorded with the backbone)
        channel = sam_image_channel(config, trainer.dataset_json["channel_names"], trainer.unit_intensities(config))
        config = replace(config, image_channel=channel)
        if channel is not None:
            log(f"SAM input: channel {channel} ({trainer.dataset_json['channel_names'][str(channel)]}) repeated "
                f"to three, as the backbone was trained")
    trainer.sam_config, trainer.target_label, trainer.seed = config, target_label, spec.seed
    if sam_prompt is not None:
        trainer.sam_prompt = sam_prompt
        log(f"SAM prompts: {sam_prompt} per slice (--sam-prompt)")
    given = {k: v for k, v in (network_options or {}).items() if v is not None}
    options = {}
    if trainer.network_options is not None:
        options = trainer.network_options = {**trainer.network_options, **given, "seed": spec.seed}
    return {"backbone": asdict(config), "target_label": target_label,
            "network_options": options, "sam_prompt": sam_prompt,
            "note": config.describe()}


def train(spec: RunSpec, preprocessed_root: Path, results_root: Path, epochs: int | None = None,
          iterations_per_epoch: int | None = None, device: str | None = None, continue_training: bool = False,
          num_workers: int | None = None, log=print, loss: LossOptions | None = None,
          backbone: BackboneOptions | None = None, network: NetworkOptions | None = None,
          num_gpus: int = 1) -> Path:
    """Train ``spec.method`` and return its run folder (checkpoints, logs, calibnet_run.json): :func:`training_job`
    then :func:`run_training_job` (without the run's lock, the finished-run check or the resume of an interrupted
    run, which ``calibnet.launch.train_and_predict`` adds)."""
    return run_training_job(training_job(spec, preprocessed_root, results_root, epochs, iterations_per_epoch, device,
                                         continue_training, num_workers, loss, backbone, network, num_gpus), log)


def training_job(spec: RunSpec, preprocessed_root: Path, results_root: Path, epochs: int | None = None,
                 iterations_per_epoch: int | None = None, device: str | None = None, continue_training: bool = False,
                 num_workers: int | None = None, loss: LossOptions | None = None,
                 backbone: BackboneOptions | None = None, network: NetworkOptions | None = None,
                 num_gpus: int = 1) -> "TrainingJob":
    """The checked training of ``spec.method``; nothing is written.

    ``num_workers`` sets nnU-Net's data-augmentation processes (``nnUNet_n_proc_DA``; 0 = in the main
    process) for this training only. ``loss``, ``backbone`` and ``network`` are checked against the flags the
    method declares before anything is written: SAM methods take the SAM backbone options and the target,
    SAM 2 methods the SAM 2 ones, medsam_u also network options (adapters, UGMP/UGPA; recorded in
    calibnet_run.json). A method that does not train (vanilla SAM) only writes its checkpoint.

    ``num_gpus`` > 1 trains with nnU-Net's DDP, one process per GPU (``calibnet.launch.ddp``); it needs that many
    CUDA devices and a method whose trainer ``supports_ddp`` (checked before anything is written).
    """
    method = get_method(spec.method)
    if method.trains_head:
        raise CalibnetError(f"{spec.method} is trained on a finished base run: pass --base METHOD "
                            f"(e.g. --base nnunet).")
    if num_gpus > 1:
        from calibnet.launch.ddp import check_cuda_devices

        check_cuda_devices(num_gpus)
    check_num_gpus(method, num_gpus, device)
    checkpoint = resume_checkpoint(locate_run(spec, preprocessed_root, results_root))
    if continue_training and checkpoint is None:
        raise CalibnetError(f"--continue: no checkpoint in {locate_run(spec, preprocessed_root, results_root)} to "
                            f"continue from; train without --continue.")
    backbone = backbone or BackboneOptions()
    if continue_training:  # the run keeps the prompts it was trained with
        record = locate_run(spec, preprocessed_root, results_root) / RUN_FILENAME
        check_recorded_sam_prompt(method, read_run(record.parent) if record.is_file() else None, backbone.sam_prompt,
                                  predict_only=False)
    return TrainingJob(spec, Path(preprocessed_root), Path(results_root), epochs, iterations_per_epoch, device,
                       continue_training, checkpoint if continue_training else None, num_workers,
                       backbone=_resolve_backbone(method, backbone), target_label=backbone.target_label,
                       sam_prompt=check_sam_prompt(method, backbone.sam_prompt),
                       network_options=check_network_options(method, network or NetworkOptions()),
                       loss_options=check_loss_options(method, loss or LossOptions()), num_gpus=num_gpus)


def run_training_job(job: "TrainingJob", log=print) -> Path:
    """Train ``job`` in this process, or with one process per GPU; returns the folder it trained in."""
    if job.num_gpus > 1:
        from calibnet.launch.ddp import train_on_gpus

        return train_on_gpus(job, log)
    return run_job(job, log)


def resume_or_refuse(job: "TrainingJob", folder: Path, overwrite: bool, log=print) -> tuple["TrainingJob", bool]:
    """What training ``job`` does with what its run ``folder`` holds (to be called holding the run's lock): (the
    job, whether it trains beside the folder and replaces it at the end). A finished run is refused unless
    ``overwrite``; an interrupted one (a checkpoint but no checkpoint_final.pth and calibnet_run.json) is resumed
    from its latest checkpoint unless ``overwrite``; ``--continue`` resumes whatever is there."""
    state = run_state(folder)
    if job.continue_training:
        return replace(job, checkpoint=resume_checkpoint(folder) or job.checkpoint), False
    if state == "new":
        return job, False
    if overwrite:
        log(f"--overwrite: training afresh beside {folder}; the {state} run there is replaced once the new one "
            f"has trained (kept as it is if this training fails or is stopped)")
        return job, True
    if state == "finished":
        raise CalibnetError(f"{folder} holds a finished run (checkpoint_final.pth and {RUN_FILENAME}); pass "
                            f"--overwrite to train it again, or --predict-only to predict its cases again.")
    checkpoint = resume_checkpoint(folder)
    if not get_method(job.spec.method).trainer_class().trains:
        return job, True  # nothing to resume: written again, replacing what is there
    missing = "checkpoint_final.pth" if not (Path(folder) / "checkpoint_final.pth").is_file() else RUN_FILENAME
    log(f"{folder} holds an interrupted training ({checkpoint.name}, no {missing}): continuing it; pass --overwrite "
        f"to train from scratch instead")
    return replace(job, continue_training=True, checkpoint=checkpoint), False


@dataclass(frozen=True)
class TrainingJob:
    """A training that :func:`training_job` has checked: what a process training it needs (picklable, so that each
    rank of a multi-GPU training gets it)."""
    spec: RunSpec
    preprocessed_root: Path
    results_root: Path
    epochs: int | None = None
    iterations_per_epoch: int | None = None
    device: str | None = None  # a rank: its own cuda:RANK
    continue_training: bool = False
    checkpoint: Path | None = None  # what --continue (or the rerun of an interrupted run) resumes from
    num_workers: int | None = None
    backbone: tuple | None = None  # (config, warning) of a SAM or SAM 2 backbone
    target_label: int | None = None
    sam_prompt: str | None = None  # --sam-prompt, where it differs from the method's own prompts
    network_options: dict = field(default_factory=dict)
    loss_options: dict = field(default_factory=dict)  # checked values
    num_gpus: int = 1
    folder: Path | None = None  # where to train, when not in the run folder (--overwrite: a sibling swapped in after)


def run_job(job: TrainingJob, log=print, rank: int = 0) -> Path:
    """Build the trainer of ``job`` and train it in this process, as rank ``rank`` of ``job.num_gpus``; rank 0
    writes calibnet_run.json. Returns the run folder."""
    spec = job.spec
    trainer, method, dataset_name, fold_text, folder = prepare_trainer(spec, job.preprocessed_root, job.results_root,
                                                                        job.device, job.continue_training, job.folder)
    if rank:  # its own batches (DDP gives every rank the weights of rank 0)
        seed_everything(spec.seed + rank)
    sam_record = _configure_sam(trainer, method, spec, job.backbone, job.target_label, log, job.network_options,
                                job.sam_prompt)
    applied = _set_loss_options(trainer, method, job.loss_options)
    _set_schedule(trainer, job.epochs, job.iterations_per_epoch)
    trainer.save_every = 1  # checkpoint_latest.pth after every epoch (nnU-Net: 50), so that a killed training resumes
    if job.continue_training:
        trainer.load_checkpoint(str(job.checkpoint))
        if rank == 0:
            log(f"resuming {folder} from {job.checkpoint.name} at epoch {trainer.current_epoch} of "
                f"{trainer.num_epochs} (weights, optimizer and schedule as saved)")
    record = RunRecord(spec=asdict(spec), dataset_name=dataset_name, trainer=trainer.__class__.__name__,
                       fold_description=fold_text, epochs=trainer.num_epochs,
                       iterations_per_epoch=trainer.num_iterations_per_epoch, device=str(trainer.device),
                       loss_options=applied, num_gpus=job.num_gpus, **sam_record)
    gpus = f" on {job.num_gpus} GPUs (nnU-Net DDP)" if job.num_gpus > 1 else ""
    trainer.print_to_log_file(f"calibnet run: method {spec.method}, {spec.split} {fold_text}, seed {spec.seed}, "
                              f"loss options {applied}{gpus}" + (f" — {record.note}" if record.note else ""))
    if not trainer.trains:
        _save_untrained(trainer)
    else:
        _run_training(trainer, job.num_workers)
    if rank == 0:
        write_run(folder, asdict(record))
    return folder


def _set_schedule(trainer, epochs: int | None, iterations_per_epoch: int | None) -> None:
    """Epochs and iterations per epoch (validation: a fifth of them), where given."""
    if epochs is not None:
        trainer.num_epochs = int(epochs)
    if iterations_per_epoch is not None:
        trainer.num_iterations_per_epoch = int(iterations_per_epoch)
        trainer.num_val_iterations_per_epoch = max(1, int(iterations_per_epoch) // 5)


def _run_training(trainer, num_workers: int | None) -> None:
    """nnU-Net's training loop with ``nnUNet_n_proc_DA`` set to ``num_workers`` for its duration."""
    previous_workers = os.environ.get("nnUNet_n_proc_DA")
    if num_workers is not None:
        os.environ["nnUNet_n_proc_DA"] = str(num_workers)
    try:
        with workers_die_with_parent():
            trainer.run_training()
    finally:
        _stop_dataloaders(trainer)
        if num_workers is not None:
            if previous_workers is None:
                os.environ.pop("nnUNet_n_proc_DA", None)
            else:
                os.environ["nnUNet_n_proc_DA"] = previous_workers


def base_run_of(spec: RunSpec, base: str, preprocessed_root: Path, results_root: Path) -> tuple[Path, dict, Path]:
    """(run folder, calibnet_run.json, checkpoint) of the finished base run a head is trained on."""
    method = get_method(base)
    if method.trains_head or method.uses_sam or method.trainer_class().requires_prompts:
        heads_on = ", ".join(m.alias for m in METHODS.values()
                             if not (m.trains_head or m.uses_sam or m.trainer_class().requires_prompts))
        raise CalibnetError(f"--base {base}: a confidence head attaches to an nnU-Net U-Net without prompt inputs; "
                            f"choose one of {heads_on}.")
    base_spec = replace(spec, method=base)
    folder = locate_run(base_spec, preprocessed_root, results_root)
    checkpoint = model_checkpoint(folder)
    if not (folder / RUN_FILENAME).is_file() or checkpoint is None:
        raise CalibnetError(f"no finished {base} run in {folder}; train the base first: calib_train "
                            f"{spec.dataset_id} {spec.configuration} {base} {spec.fold} --split {spec.split} "
                            f"--seed {spec.seed}.")
    return folder, read_run(folder), checkpoint


def train_confidence_head(spec: RunSpec, head: HeadOptions, preprocessed_root: Path, results_root: Path,
                          epochs: int | None = None, iterations_per_epoch: int | None = None,
                          device: str | None = None, num_workers: int | None = None, log=print) -> Path:
    """Train a confidence head on the frozen network of ``head.base`` (same dataset, configuration, split,
    fold and seed); returns the head's folder inside the base run."""
    from calibnet.networks.confidence_head import head_folder

    check_head_options(get_method(spec.method), head)
    base_folder, base_record, base_checkpoint = base_run_of(spec, head.base, preprocessed_root, results_root)
    folder = head_folder(base_folder, head.adversarial)
    trainer, method, _, fold_text, _ = prepare_trainer(spec, preprocessed_root, results_root, device, folder=folder)
    trainer.output_folder_base = str(folder)  # nnU-Net's plans/dataset copies go beside the head
    trainer.attach_base(get_method(head.base).trainer_class(), base_checkpoint, base_record)
    trainer.adversarial = head.adversarial
    if head.warmup_batches is not None:
        trainer.warmup_batches = int(head.warmup_batches)
    if head.patience is not None:
        trainer.patience = int(head.patience)
    _set_schedule(trainer, epochs, iterations_per_epoch)
    kind = "adversarial" if head.adversarial else "plain, no adversarial perturbations"
    log(f"training a confidence head ({kind}) on {head.base} ({spec.split} {fold_text}, seed {spec.seed}) "
        f"into {folder}")
    trainer.print_to_log_file(f"calibnet confidence head ({kind}) on {base_checkpoint}; warm-up "
                              f"{trainer.warmup_batches} batches, patience {trainer.patience} epochs")
    _run_training(trainer, num_workers)
    return folder


def _save_untrained(trainer) -> None:
    """Write a method that needs no training (vanilla SAM) as a checkpoint, with nnU-Net's plan copies."""
    from batchgenerators.utilities.file_and_folder_operations import save_json
    trainer.initialize()
    trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    save_json(trainer.plans_manager.plans, str(Path(trainer.output_folder_base) / "plans.json"), sort_keys=False)
    save_json(trainer.dataset_json, str(Path(trainer.output_folder_base) / "dataset.json"), sort_keys=False)
    trainer.current_epoch = 0
    trainer.save_checkpoint(str(Path(trainer.output_folder) / "checkpoint_final.pth"))
    trainer.print_to_log_file("no training: the pretrained model is used as it is")
