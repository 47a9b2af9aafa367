"""calib_export: one calibnet run as an nnU-Net model folder, so that nnU-Net's own ``nnUNetv2_predict -d D -c C
-tr TRAINER -p CalibPlans -f F`` (or ``nnUNetv2_predict_from_modelfolder -m FOLDER -f F``) predicts with it.

nnU-Net reads ``<model folder>/fold_F/checkpoint_final.pth`` beside the folder's dataset.json and plans.json; a
calibnet run lives in ``<split>_fold<F>_seed<S>/`` of the same trainer folder (several splits and seeds per fold), so
one run at a time is exported into ``fold_F/``: what inference reads of the run's model checkpoint (the one
``runs.model_checkpoint`` picks, as calib_predict does; no optimizer state) and ``calibnet_export.json``, naming the
run it came from.

nnU-Net rebuilds the network from the checkpoint's ``trainer_name`` alone (``build_network_architecture``; inference
uses nothing else of the trainer). A trainer that keeps nnU-Net's network is exported as ``nnUNetTrainer``, which plain
nnU-Net finds; one whose network calibnet builds (nnunet_dropout) keeps its class, which nnU-Net finds through
``nnUNet_extTrainer`` (:func:`external_trainer_folder`). SAM methods (nnU-Net's predictor cannot prompt them),
prompt-channel methods (guided_nnunet) and confidence heads are refused.
"""
from __future__ import annotations

import json
import shlex
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from calibnet.checkpoints import UnsafeCheckpointError, load_checkpoint
from calibnet.errors import CalibnetError
from calibnet.files import atomic_output_dir, atomic_write_json, file_sha256
from calibnet.launch.training_run import locate_run
from calibnet.methods import Method, get_method
from calibnet.runs import (CALIB_PLANS_NAME, RUN_FILENAME, RunSpec, export_dataset_json, model_checkpoint,
                           read_run)

EXPORT_RECORD = "calibnet_export.json"
EXPORTED_CHECKPOINT = "checkpoint_final.pth"  # the one nnUNetv2_predict reads unless -chk says otherwise
NNUNET_BASE_TRAINER = "nnUNetTrainer"
# what nnU-Net's predictor reads of a checkpoint (initialize_from_trained_model_folder), plus the epoch for the record
INFERENCE_KEYS = ("network_weights", "init_args", "trainer_name", "inference_allowed_mirroring_axes", "current_epoch")


def external_trainer_folder() -> str:
    """What ``nnUNet_extTrainer`` must name for nnU-Net to find calibnet's trainer classes at prediction time: the
    ``calibnet/trainers`` folder itself, so that nnU-Net's search imports the trainer modules only (the folder above
    the package would be site-packages in a non-editable install, every module of which nnU-Net would import)."""
    import calibnet.trainers

    return str(Path(calibnet.trainers.__file__).resolve().parent)


def nnunet_trainer_name(method: Method) -> str:
    """The trainer class an exported checkpoint of ``method`` names: nnU-Net's base class where the method's
    network is nnU-Net's own (its trainer keeps ``build_network_architecture``), else the method's class. Refuses
    what nnU-Net's predictor cannot run."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    if method.trains_head:
        raise CalibnetError(f"{method.alias} is a confidence head on a base run, not a segmentation network: export "
                            f"the base method (e.g. calib_export ... nnunet ...).")
    if method.uses_sam:
        raise CalibnetError(f"{method.alias} is a SAM method: nnU-Net's predictor cannot give it its prompts, so "
                            f"nnU-Net's tools cannot predict with it; use calib_predict.")
    trainer_class = method.trainer_class()
    if trainer_class.requires_prompts:
        raise CalibnetError(f"{method.alias} takes prompt channels drawn from labels, which nnU-Net's predictor "
                            f"cannot give; use calib_predict --prompts-from LABELS.")
    if trainer_class.build_network_architecture is nnUNetTrainer.build_network_architecture:
        return NNUNET_BASE_TRAINER
    return trainer_class.__name__


@dataclass
class ExportResult:
    model_folder: Path  # dataset.json, plans.json and fold_F/: what nnU-Net's -m / -tr -p -c names
    fold_folder: Path
    record: dict  # calibnet_export.json
    ext_trainer: str | None  # the nnUNet_extTrainer nnU-Net needs; None: plain nnU-Net opens it
    replaced: str | None  # what fold_F held before, when another run (--overwrite)
    command: str  # nnU-Net's command that predicts with it

    @property
    def lines(self) -> list:
        spec = self.record["spec"]
        lines = [f"exported {spec['method']} {spec['split']} fold {spec['fold']} seed {spec['seed']} "
                 f"({self.record['run']}) to {self.fold_folder}"]
        if self.replaced:
            lines.append(f"  replaced {self.replaced}")
        lines.append(f"  checkpoint trainer: {self.record['trainer_name']}" + (
            " (nnU-Net's own network: plain nnU-Net opens it)" if self.ext_trainer is None else
            f" (a network calibnet builds: nnU-Net finds it with nnUNet_extTrainer={self.ext_trainer})"))
        return lines + ["predict with nnU-Net (add --disable_tta to match calib_predict --disable-tta):",
                        f"  {self.command}"]


def export_run(spec: RunSpec, preprocessed_root: Path, results_root: Path, output_dir: Path | None = None,
               overwrite: bool = False) -> ExportResult:
    """Write the nnU-Net model folder of the run ``spec``: ``fold_F/`` in the run's trainer folder (where
    ``nnUNetv2_predict -tr TRAINER -p CalibPlans -c CONFIGURATION -f F`` looks), or, with ``output_dir``, a complete
    model folder there (dataset.json, plans.json, fold_F/). A fold_F holding another run, or model files of another
    dataset in ``output_dir``, are refused unless ``overwrite``. fold_F is written whole (a temporary sibling
    renamed into place)."""
    method = get_method(spec.method)
    trainer_name = nnunet_trainer_name(method)
    run_folder = locate_run(spec, preprocessed_root, results_root)
    if not (run_folder / RUN_FILENAME).is_file():
        raise CalibnetError(f"{spec.method} ({spec.configuration}, {spec.split} fold {spec.fold}, seed {spec.seed}) "
                            f"has no finished run: {run_folder / RUN_FILENAME} is missing; train it with: "
                            f"{spec.training_command}")
    record = read_run(run_folder)
    checkpoint_path, checkpoint = _read_model_checkpoint(run_folder, spec)
    dataset_json = export_dataset_json(json.loads((run_folder.parent / "dataset.json").read_text()), record)
    plans = json.loads((run_folder.parent / "plans.json").read_text())
    weights = {k: checkpoint[k] for k in INFERENCE_KEYS if k in checkpoint}
    weights["trainer_name"] = trainer_name
    _check_nnunet_builds_it(trainer_name, method, plans, dataset_json, spec.configuration, weights, checkpoint_path)

    model_folder = Path(output_dir).absolute() if output_dir is not None else run_folder.parent
    fold_folder = model_folder / f"fold_{spec.fold}"
    export_record = {"spec": asdict(spec), "run": str(run_folder), "trainer": record["trainer"],
                     "trainer_name": trainer_name, "checkpoint": checkpoint_path.name,
                     "sha256": file_sha256(checkpoint_path)}
    replaced = _check_destination(model_folder, fold_folder, export_record, dataset_json, plans, overwrite)
    if model_folder != run_folder.parent:
        atomic_write_json(model_folder / "dataset.json", dataset_json)
        atomic_write_json(model_folder / "plans.json", plans)
    with atomic_output_dir(fold_folder, overwrite=True) as partial:
        torch.save(weights, partial / EXPORTED_CHECKPOINT)
        atomic_write_json(partial / EXPORT_RECORD, export_record)
    ext_trainer = None if trainer_name == NNUNET_BASE_TRAINER else external_trainer_folder()
    command = _nnunet_command(spec, record, model_folder, results_root, output_dir is not None, ext_trainer)
    return ExportResult(model_folder, fold_folder, export_record, ext_trainer, replaced, command)


def _read_model_checkpoint(run_folder: Path, spec: RunSpec) -> tuple:
    """(path, contents) of the run's model checkpoint, read weights-only."""
    path = model_checkpoint(run_folder)
    if path is None:
        raise CalibnetError(f"{run_folder} holds no checkpoint; train the run first ({spec.training_command}).")
    try:
        checkpoint = load_checkpoint(path)
    except UnsafeCheckpointError:
        raise
    except Exception as e:  # torch raises many types for truncated or foreign files
        raise CalibnetError(f"{path} cannot be read as a checkpoint ({type(e).__name__}).") from None
    if not isinstance(checkpoint, dict) or "network_weights" not in checkpoint or "init_args" not in checkpoint:
        raise CalibnetError(f"{path} is not an nnU-Net checkpoint (no network weights or init_args).")
    return path, checkpoint


def _check_nnunet_builds_it(trainer_name: str, method: Method, plans: dict, dataset_json: dict, configuration: str,
                            weights: dict, checkpoint_path: Path) -> None:
    """Build the network as nnU-Net's predictor will (the class ``trainer_name``) and load the weights into it, so
    that an export nnU-Net could not open is never written."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    trainer_class = nnUNetTrainer if trainer_name == NNUNET_BASE_TRAINER else method.trainer_class()
    plans_manager = PlansManager(plans)
    configuration_manager = plans_manager.get_configuration(configuration)
    network = trainer_class.build_network_architecture(
        plans_manager, configuration_manager,
        determine_num_input_channels(plans_manager, configuration_manager, dataset_json),
        plans_manager.get_label_manager(dataset_json).num_segmentation_heads, enable_deep_supervision=False)
    try:
        network.load_state_dict(weights["network_weights"])
    except (RuntimeError, KeyError) as e:
        raise CalibnetError(f"{checkpoint_path} does not fit the network {trainer_name} builds from the plans "
                            f"({str(e).splitlines()[0]}); nothing was exported.") from None


def _check_destination(model_folder: Path, fold_folder: Path, export_record: dict, dataset_json: dict, plans: dict,
                       overwrite: bool) -> str | None:
    """Refuse (unless ``overwrite``) a fold folder holding another model and model files of another dataset or
    plans; returns what the fold folder held, when another run."""
    for name, ours in (("dataset.json", dataset_json), ("plans.json", plans)):
        path = model_folder / name
        if path.is_file() and json.loads(path.read_text()) != ours and not overwrite:
            raise CalibnetError(f"{path} is not this run's {name} (a model of another dataset or plans is there); "
                                f"choose another -o, or pass --overwrite to replace it.")
    if not fold_folder.exists():
        return None
    record_path = fold_folder / EXPORT_RECORD
    held = json.loads(record_path.read_text()) if record_path.is_file() else None
    if held is not None and held.get("spec") == export_record["spec"]:
        return None  # this run's own earlier export: brought up to date
    described = "a model calib_export did not write (nnU-Net's own training?)" if held is None else \
        "{method} {split} fold {fold} seed {seed}".format(**held["spec"]) + f" ({held.get('run')})"
    if not overwrite:
        raise CalibnetError(f"{fold_folder} holds {described}; pass --overwrite to replace it, or -o FOLDER to "
                            f"export into a model folder of its own.")
    return described


def _nnunet_command(spec: RunSpec, record: dict, model_folder: Path, results_root: Path, own_folder: bool,
                    ext_trainer: str | None) -> str:
    """The shell line of nnU-Net's prediction with the export (INPUT_FOLDER and OUTPUT_FOLDER to fill in)."""
    env = f"nnUNet_extTrainer={shlex.quote(ext_trainer)} " if ext_trainer else ""
    if own_folder:
        return (f"{env}nnUNetv2_predict_from_modelfolder -m {shlex.quote(str(model_folder))} -f {spec.fold} "
                f"-i INPUT_FOLDER -o OUTPUT_FOLDER")
    return (f"{env}nnUNet_results={shlex.quote(str(Path(results_root).absolute()))} nnUNetv2_predict -d "
            f"{record['dataset_name']} -c {spec.configuration} -tr {record['trainer']} -p {CALIB_PLANS_NAME} "
            f"-f {spec.fold} -i INPUT_FOLDER -o OUTPUT_FOLDER")
