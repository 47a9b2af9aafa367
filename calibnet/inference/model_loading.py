"""A trained run as a model to predict with: its network rebuilt from the trainer class and the run record,
the checkpoint chosen by ``calibnet.runs.model_checkpoint``, wrapped in nnU-Net's predictor, with the
confidence heads trained on it.

How a prediction reaches the network. nnU-Net's predictor calls only ``network(x)``, so what a SAM network
must know about the case it predicts (the prompts of a prompt-quality setting, the case id that seeds
MedSAM-U's jitter, the setting's name) is handed to it for the span of that one prediction:
:meth:`LoadedModel.predict_logits` runs the predictor inside ``network.predicting(prompt_sets, case_id,
setting)``, the context manager declared on ``calibnet.networks.sam_backbone.SamSliceSegmenter`` (see
there). Nothing is left set on the network between cases.

Several folds of one method are one model (:func:`load_fold_ensemble`), ensembled as ``nnUNetv2_predict -f 0 1``
does: the mean of the folds' logits on the preprocessed grid (nnU-Net 2.8.1's
``predict_logits_from_preprocessed_data`` sums the logits of its ``list_of_parameters`` and divides), then one
softmax/sigmoid, resampling and argmax. nnU-Net networks share one predictor with every fold's weights in that
list; SAM networks are one model per fold (their embedding store and prompt context are per network) whose logits
are averaged the same way.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from calibnet.checkpoints import UnsafeCheckpointError, load_checkpoint
from calibnet.errors import CalibnetError
from calibnet.networks.embedding_store import EMBEDDINGS_FOLDER
from calibnet.runs import MODEL_CHECKPOINTS, export_dataset_json, model_checkpoint, read_run, target_mask

if TYPE_CHECKING:
    from calibnet.inference.cases import PreparedCase


@dataclass
class LoadedModel:
    predictor: object  # nnUNetPredictor
    trainer_class: type
    plans_manager: object
    configuration_manager: object
    dataset_json: dict
    checkpoint: Path
    record: dict  # calibnet_run.json
    network: torch.nn.Module  # the network the predictor runs (before any torch.compile of nnU-Net's)
    heads: list = field(default_factory=list)  # LoadedHead: confidence heads trained on this run
    feature_capture: object = None  # FeatureCapture feeding the heads
    ensemble: list = field(default_factory=list)  # SAM: the other folds' LoadedModels, logits averaged with these
    folds: tuple = ()  # the folds ensembled (several), () for one run

    @property
    def is_sam(self) -> bool:
        """A slice-wise SAM or SAM 2 network (``calibnet.networks.sam_backbone.SamSliceSegmenter``)."""
        return self.record.get("backbone") is not None

    @property
    def export_dataset_json(self) -> dict:
        return export_dataset_json(self.dataset_json, self.record)

    def prompt_foreground(self, seg: np.ndarray) -> np.ndarray:
        return target_mask(seg, self.record.get("target_label"))

    def prompt_inputs(self, foreground: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
        """The prompt channels of a case (``requires_prompts``): a SAM network's boxes or points as the network
        was built from the run's record (``use_box``: the run's --sam-prompt, else the class's)."""
        if self.is_sam:
            return self.trainer_class.prompt_inputs(foreground, rng, use_box=self.network.use_box)
        return self.trainer_class.prompt_inputs(foreground, rng)

    def predict_logits(self, case: PreparedCase) -> torch.Tensor:
        """nnU-Net's logits of a prepared case. A SAM network sees the whole case in one window and is told
        the case's prompt sets, id and prompt setting for this prediction only (``network.predicting``)."""
        if not self.is_sam:
            return self.predictor.predict_logits_from_preprocessed_data(case.data)
        if self.ensemble:
            members = [self, *self.ensemble]
            return sum(m._sam_logits(case).cpu() for m in members) / len(members)
        return self._sam_logits(case)

    def _sam_logits(self, case: PreparedCase) -> torch.Tensor:
        from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

        self.predictor.configuration_manager = ConfigurationManager(  # SAM sees each slice entire
            dict(self.configuration_manager.configuration, patch_size=list(case.data.shape[1:])))
        with self.network.predicting(case.prompt_sets, case.case_id, case.setting):
            return self.predictor.predict_logits_from_preprocessed_data(case.data)

    def prediction_summary(self) -> dict:
        """The network's own confidence.json entries for its last prediction (MedSAM-U: UGMP, UGPA); an ensemble's
        entries name the folds ensembled (``ensembled_folds``)."""
        own = self.network.prediction_summary() if self.is_sam else {}
        return {**own, "ensembled_folds": list(self.folds)} if self.folds else own

    def prediction_settings(self) -> dict:
        """What prompts.json records about how the network predicts (MedSAM-U: whether UGPA runs)."""
        return self.network.prediction_settings() if self.is_sam else {}

    @property
    def writes_uncertainty_map(self) -> bool:
        """Whether each prediction gets a CASE_uncertainty.npz, the entropy of its output (MedSAM-U)."""
        return self.is_sam and self.network.writes_uncertainty_map


def _read_checkpoint(run_folder: Path, record: dict, checkpoint_name: str | None) -> tuple:
    """(path, contents) of the run's model checkpoint, refusing a missing, unreadable or foreign one."""
    checkpoint_path = model_checkpoint(run_folder, checkpoint_name)
    if checkpoint_path is None:
        raise CalibnetError(f"no {' or '.join((checkpoint_name,) if checkpoint_name else MODEL_CHECKPOINTS)} in "
                            f"{run_folder}; train the model first.")
    try:
        checkpoint = load_checkpoint(checkpoint_path)  # weights_only: a checkpoint carrying code is refused
    except UnsafeCheckpointError:
        raise
    except Exception as e:  # torch raises many types for truncated or foreign files
        raise CalibnetError(f"{checkpoint_path} cannot be read as a checkpoint ({type(e).__name__}).") from None
    if not isinstance(checkpoint, dict) or "network_weights" not in checkpoint:
        raise CalibnetError(f"{checkpoint_path} is not an nnU-Net checkpoint (no network weights).")
    if checkpoint.get("trainer_name", record["trainer"]) != record["trainer"]:
        raise CalibnetError(f"{checkpoint_path} was written by {checkpoint['trainer_name']}, but this run folder "
                            f"belongs to {record['trainer']}; put the run's own checkpoint back or retrain.")
    return checkpoint_path, checkpoint


def _build_network(trainer_class: type, record: dict, plans_manager, configuration_manager, dataset_json: dict,
                   network_options: dict | None) -> torch.nn.Module:
    """The run's architecture, untrained: a SAM network from the recorded backbone, network options
    (``network_options`` overriding them) and prompts (``"sam_prompt"``), else nnU-Net's network of the plans."""
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

    if record.get("backbone") is not None:
        options = {**record.get("network_options", {}), **(network_options or {})}
        if record.get("sam_prompt"):  # --sam-prompt (SAM-FT): the prompts it was trained with, not the class's
            options["use_box"] = record["sam_prompt"] == "box"
        return trainer_class.network_for(trainer_class.backbone_config(record["backbone"]), load_weights=False,
                                         **options)
    label_manager = plans_manager.get_label_manager(dataset_json)
    return trainer_class.build_network_architecture(
        plans_manager, configuration_manager,
        determine_num_input_channels(plans_manager, configuration_manager, dataset_json),
        label_manager.num_segmentation_heads, enable_deep_supervision=False)


def load_model(run_folder: Path, device: str = "cpu", use_mirroring: bool = True,
               checkpoint_name: str | None = None, with_heads: bool = True,
               network_options: dict | None = None, preprocessed_root: Path | None = None,
               tile_step_size: float = 0.5) -> LoadedModel:
    """Rebuild the trained network of ``run_folder`` (architecture from its trainer class) and wrap it in
    nnU-Net's predictor, with the confidence heads trained on it, if any (unless ``with_heads`` is off).
    ``network_options`` override the recorded options of a SAM network (e.g. {"ugpa": False}). A SAM network
    with a frozen encoder reads and keeps its slice embeddings in the dataset's embedding store under
    ``preprocessed_root``, when given. ``tile_step_size``: the sliding window's step, a fraction of the patch."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from calibnet.inference.confidence_heads import FeatureCapture, load_heads
    from calibnet.methods import method_of_trainer

    run_folder = Path(run_folder)
    record = read_run(run_folder)
    checkpoint_path, checkpoint = _read_checkpoint(run_folder, record, checkpoint_name)
    trainer_class = method_of_trainer(record["trainer"]).trainer_class()
    plans_manager = PlansManager(json.loads((run_folder.parent / "plans.json").read_text()))
    dataset_json = json.loads((run_folder.parent / "dataset.json").read_text())
    configuration_manager = plans_manager.get_configuration(record["spec"]["configuration"])
    network = _build_network(trainer_class, record, plans_manager, configuration_manager, dataset_json,
                             network_options)
    try:
        network.load_state_dict(checkpoint["network_weights"])
    except (RuntimeError, KeyError) as e:
        raise CalibnetError(f"{checkpoint_path} does not fit the {trainer_class.__name__} architecture of this "
                            f"dataset's plans ({str(e).splitlines()[0]}).") from None
    if preprocessed_root is not None and record.get("backbone") is not None and trainer_class.caches_embeddings:
        network.use_embedding_store(Path(preprocessed_root) / record["dataset_name"] / EMBEDDINGS_FOLDER)
    device = torch.device(device)
    predictor = nnUNetPredictor(tile_step_size=tile_step_size, use_gaussian=True,
                                use_mirroring=use_mirroring and trainer_class.predicts_with_mirroring,
                                perform_everything_on_device=device.type == "cuda", device=device,
                                allow_tqdm=False)
    predictor.manual_initialization(network, plans_manager, configuration_manager, [checkpoint["network_weights"]],
                                    export_dataset_json(dataset_json, record), trainer_class.__name__,
                                    checkpoint.get("inference_allowed_mirroring_axes"))
    heads = load_heads(run_folder, device) if with_heads and record.get("backbone") is None else []
    capture = FeatureCapture(predictor, heads[0].head.features[0].in_channels) if heads else None
    return LoadedModel(predictor, trainer_class, plans_manager, configuration_manager, dataset_json, checkpoint_path,
                       record, network, heads, capture)


# what changes a run's predictions besides its weights: folds ensembled must agree on these
_ENSEMBLE_IDENTITY = ("trainer", "backbone", "target_label", "sam_prompt", "network_options")


def load_fold_ensemble(run_folders: dict, device: str = "cpu", use_mirroring: bool = True,
                       checkpoint_name: str | None = None, preprocessed_root: Path | None = None,
                       tile_step_size: float = 0.5) -> LoadedModel:
    """One model of the runs ``{fold: folder}`` of one method (see the module's docstring for how the folds are
    ensembled); one fold is :func:`load_model` itself. Confidence heads are not loaded for an ensemble: each reads
    its own fold's features, and an ensemble has no single network they describe."""
    if len(run_folders) == 1:
        (folder,) = run_folders.values()
        return load_model(folder, device, use_mirroring, checkpoint_name, preprocessed_root=preprocessed_root,
                          tile_step_size=tile_step_size)
    models = {fold: load_model(folder, device, use_mirroring, checkpoint_name, with_heads=False,
                               preprocessed_root=preprocessed_root, tile_step_size=tile_step_size)
              for fold, folder in sorted(run_folders.items())}
    (first_fold, first), *others = models.items()
    for fold, model in others:
        for key in _ENSEMBLE_IDENTITY:
            mine, theirs = first.record.get(key), model.record.get(key)
            if key == "network_options":
                mine, theirs = ({k: v for k, v in (o or {}).items() if k != "seed"} for o in (mine, theirs))
            if mine != theirs:
                raise CalibnetError(f"folds {first_fold} and {fold} differ in {key} ({mine} vs {theirs}): they are "
                                    f"not one model to ensemble; predict them separately.")
    if first.is_sam and first.prediction_settings():
        raise CalibnetError(f"{first.trainer_class.__name__} decides its prompts per network (e.g. MedSAM-U's UGPA), "
                            f"so its folds cannot be ensembled; predict one fold.")
    first.folds = tuple(models)
    if first.is_sam:
        first.ensemble = [model for _, model in others]
    else:  # nnU-Net's own multi-fold mechanism: one network, each fold's weights in turn
        first.predictor.list_of_parameters = [p for model in models.values()
                                              for p in model.predictor.list_of_parameters]
    return first
