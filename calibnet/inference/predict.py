"""Prediction with a trained calibnet model, through nnU-Net's own preprocessing, sliding-window predictor
and export, case by case: segmentation (.nii.gz), softmax probabilities (.npz, key ``probabilities``,
float32 as nnU-Net writes them, (C, z, y, x) at the original geometry) and ``confidence.json``.

Each case's files are written in a temporary folder and moved into place only when complete.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from calibnet.errors import CalibnetError
from calibnet.files import atomic_write_json
from calibnet.metrics.entropy import binary_entropy, normalised_entropy
from calibnet.metrics.segmentation import case_metrics, overlap_metrics
from calibnet.networks.confidence_head import HEAD_FOLDERS
from calibnet.paths import channel_files
from calibnet.runs import (CONFIDENCE_FILENAME, MODEL_CHECKPOINTS, NO_UGPA, ROLES, export_dataset_json,
                           model_checkpoint, prediction_folder, read_run, target_mask)



@dataclass(frozen=True)
class CaseInput:
    case_id: str
    images: tuple  # one file per channel
    label: Path | None = None  # ground truth, needed only for prompt-guided models


@dataclass
class LoadedModel:
    predictor: object  # nnUNetPredictor
    trainer_class: type
    plans_manager: object
    configuration_manager: object
    dataset_json: dict
    checkpoint: Path
    record: dict  # calibnet_run.json
    heads: list = field(default_factory=list)  # LoadedHead: confidence heads trained on this run
    feature_capture: object = None  # FeatureCapture feeding the heads

    @property
    def is_sam(self) -> bool:
        return self.record.get("backbone") is not None

    @property
    def export_dataset_json(self) -> dict:
        return export_dataset_json(self.dataset_json, self.record)

    def prompt_foreground(self, seg: np.ndarray) -> np.ndarray:
        return target_mask(seg, self.record.get("target_label"))


def load_model(run_folder: Path, device: str = "cpu", use_mirroring: bool = True,
               checkpoint_name: str | None = None, with_heads: bool = True) -> LoadedModel:
    """Rebuild the trained network of ``run_folder`` (architecture from its trainer class) and wrap it in
    nnU-Net's predictor, with the confidence heads trained on it, if any (unless ``with_heads`` is off)."""
    from calibnet.inference.confidence_heads import FeatureCapture, load_heads

    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from calibnet.methods import method_of_trainer

    run_folder = Path(run_folder)
    record = read_run(run_folder)
    checkpoint_path = model_checkpoint(run_folder, checkpoint_name)
    if checkpoint_path is None:
        raise CalibnetError(f"no {' or '.join((checkpoint_name,) if checkpoint_name else MODEL_CHECKPOINTS)} in "
                            f"{run_folder}; train the model first.")
    try:
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises many types for truncated or foreign files
        raise CalibnetError(f"{checkpoint_path} cannot be read as a checkpoint ({type(e).__name__}).") from None
    if not isinstance(checkpoint, dict) or "network_weights" not in checkpoint:
        raise CalibnetError(f"{checkpoint_path} is not an nnU-Net checkpoint (no network weights).")
    if checkpoint.get("trainer_name", record["trainer"]) != record["trainer"]:
        raise CalibnetError(f"{checkpoint_path} was written by {checkpoint['trainer_name']}, but this run folder "
                            f"belongs to {record['trainer']}; put the run's own checkpoint back or retrain.")
    trainer_class = method_of_trainer(record["trainer"]).trainer_class()
    plans = json.loads((run_folder.parent / "plans.json").read_text())
    dataset_json = json.loads((run_folder.parent / "dataset.json").read_text())
    plans_manager = PlansManager(plans)
    configuration_manager = plans_manager.get_configuration(record["spec"]["configuration"])
    label_manager = plans_manager.get_label_manager(dataset_json)
    if record.get("backbone") is not None:
        network = trainer_class.network_for(trainer_class.backbone_config(record["backbone"]), load_weights=False,
                                            **record.get("network_options", {}))
    else:
        network = trainer_class.build_network_architecture(
            plans_manager, configuration_manager,
            determine_num_input_channels(plans_manager, configuration_manager, dataset_json),
            label_manager.num_segmentation_heads, enable_deep_supervision=False)
    try:
        network.load_state_dict(checkpoint["network_weights"])
    except (RuntimeError, KeyError) as e:
        raise CalibnetError(f"{checkpoint_path} does not fit the {trainer_class.__name__} architecture of this "
                            f"dataset's plans ({str(e).splitlines()[0]}).") from None
    device = torch.device(device)
    use_mirroring = use_mirroring and getattr(trainer_class, "predicts_with_mirroring", True)
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=use_mirroring,
                                perform_everything_on_device=device.type == "cuda", device=device,
                                allow_tqdm=False)
    predictor.manual_initialization(network, plans_manager, configuration_manager, [checkpoint["network_weights"]],
                                    export_dataset_json(dataset_json, record), trainer_class.__name__,
                                    checkpoint.get("inference_allowed_mirroring_axes"))
    heads = load_heads(run_folder, device) if with_heads and record.get("backbone") is None else []
    capture = FeatureCapture(predictor, heads[0].head.features[0].in_channels) if heads else None
    return LoadedModel(predictor, trainer_class, plans_manager, configuration_manager, dataset_json, checkpoint_path,
                       record, heads, capture)


def case_confidence(probabilities: np.ndarray, regions: bool) -> dict:
    """Image-level confidence scores of one prediction.

    ``mean_max_probability_foreground``: mean of max_c p_c over the predicted foreground (over all voxels
    when nothing is predicted); ``entropy_foreground``: mean entropy over the predicted foreground,
    normalised to [0, 1] by log(C) (binary entropy of the first region for region datasets).
    """
    p = probabilities.astype(np.float32)
    if regions:
        first = p[0]
        foreground = first > 0.5
        confidence = np.maximum(first, 1 - first)
        entropy = binary_entropy(first)
    else:
        foreground = p.argmax(0) > 0
        confidence = p.max(0)
        entropy = normalised_entropy(p)
    n_foreground = int(foreground.sum())
    where = foreground if n_foreground else np.ones_like(foreground)
    return {"mean_max_probability_foreground": float(confidence[where].mean()),
            "entropy_foreground": float(entropy[where].mean()),
            "predicted_foreground_voxels": n_foreground}


def mc_sample_counts(sample_counts) -> tuple:
    """The sorted, distinct N of ``--mc-samples`` (each at least 2; empty = no MC-dropout scores)."""
    counts = sorted({int(n) for n in ([sample_counts] if isinstance(sample_counts, int) else sample_counts or ())})
    if counts and counts[0] < 2:
        raise CalibnetError(f"--mc-samples {counts[0]}: score agreement compares samples pairwise; give N >= 2 "
                            f"(the paper uses 15 and 2).")
    return tuple(counts)


def mc_agreement_scores(masks, label_names: list, sample_counts, spacing) -> dict:
    """Score agreement (Roy et al. 2018) of MC-dropout samples, for each N of ``sample_counts``.

    ``masks``: (S, L, *spatial) boolean — sample s's mask of label (or region) l, S ≥ max(N). For each N, the
    first N samples are compared pairwise (N(N−1)/2 pairs, both empty = 1): ``mc_dice_agreement_n{N}`` is the
    mean over labels of the mean pairwise Dice, ``mc_nsd_agreement_n{N}`` the same with NSD@1mm (``spacing`` in
    mm, array axis order); ``..._per_label`` entries hold {label name: value}. Each pair is computed once, so
    several N cost the pairs of max(N) only.
    """
    masks = np.asarray(masks, bool)
    counts = mc_sample_counts(sample_counts)
    if masks.shape[0] < counts[-1] or masks.shape[1] != len(label_names):
        raise ValueError(f"masks of shape {masks.shape} for N up to {counts[-1]} and labels {label_names}")
    n = counts[-1]
    dice = np.full((len(label_names), n, n), np.nan)
    nsd = np.full((len(label_names), n, n), np.nan)
    for label in range(len(label_names)):
        for i in range(n):
            for j in range(i + 1, n):
                a, b = masks[i, label], masks[j, label]
                dice[label, i, j] = overlap_metrics(a, b)["DSC"]
                nsd[label, i, j] = 1.0 if dice[label, i, j] == 1.0 else case_metrics(a, b, spacing)["NSD@1mm"]
    scores = {}
    for count in counts:
        pairs = np.triu_indices(count, 1)
        for name, matrix in (("dice", dice), ("nsd", nsd)):
            per_label = {label_name: float(matrix[label][pairs].mean()) for label, label_name in enumerate(label_names)}
            scores[f"mc_{name}_agreement_n{count}"] = float(np.mean(list(per_label.values())))
            scores[f"mc_{name}_agreement_n{count}_per_label"] = per_label
    return scores


def _mc_targets(model: LoadedModel) -> tuple:
    """(names, output channels, regions) of the network's foreground outputs, in nnU-Net's order: the softmax
    channel of each foreground label, or the sigmoid channel of each region (dataset.json order)."""
    label_manager = model.plans_manager.get_label_manager(model.export_dataset_json)
    named = [(k, tuple(v) if isinstance(v, list) else v) for k, v in model.export_dataset_json["labels"].items()
             if k != "ignore"]
    if label_manager.has_regions:
        names = [k for k, v in named if v in label_manager.foreground_regions]
        return names, list(range(len(names))), True
    names = [k for k, v in sorted(named, key=lambda item: item[1]) if v != 0]
    values = sorted(v for _, v in named if v != 0)
    return names, [label_manager.all_labels.index(v) for v in values], False


def _preprocessed_spacing(model: LoadedModel, data: torch.Tensor, properties: dict | None) -> list:
    """Voxel spacing (mm) of the preprocessed grid in array axis order; 2d configurations keep the original
    spacing between slices, as nnU-Net's preprocessing does."""
    spacing = [float(s) for s in model.configuration_manager.spacing]
    if len(spacing) < data.ndim - 1:
        original = [float(properties["spacing"][i]) for i in model.plans_manager.transpose_forward] \
            if properties is not None else [1.0] * (data.ndim - 1)
        spacing = [original[0], *spacing]
    return spacing


def mc_dropout_scores(model: LoadedModel, data: torch.Tensor, sample_counts, n_image_channels: int,
                      properties: dict | None = None) -> dict:
    """MC-dropout baselines of the confidence-prediction paper (score agreement, Roy et al. 2018) for one
    preprocessed case, for each N of ``sample_counts``.

    A sample is one stochastic prediction: dropout on, test-time mirroring off (the predictor's mirroring is
    switched off for the passes and restored), so one network forward per sliding window (one forward in all
    when a window covers the case). max(N) samples are drawn once and each N uses the first N of them —
    statistically the same as separate runs of N samples, at the cost of max(N) passes. Per N:
    ``mc_dice_agreement_n{N}`` / ``mc_nsd_agreement_n{N}`` (see :func:`mc_agreement_scores`, on the
    preprocessed grid) and ``mc_mean_entropy_n{N}``, the mean normalised entropy of the N samples' mean
    probabilities over the non-zero region (softmax entropy / log C; region datasets: the mean over regions
    of the binary entropy).
    """
    from calibnet.networks.mc_dropout import set_mc_sampling

    counts = mc_sample_counts(sample_counts)
    if not counts:
        return {}
    label_names, channels, regions = _mc_targets(model)
    predictor = model.predictor
    if set_mc_sampling(predictor.network, True) == 0:
        raise CalibnetError(f"--mc-samples needs a model trained with dropout (method nnunet_dropout); "
                            f"{model.trainer_class.__name__} has none.")
    roi = (data[:n_image_channels] != 0).any(0)
    roi = roi if roi.any() else torch.ones_like(roi)
    mirroring = predictor.use_mirroring
    masks, total, entropies = [], None, {}
    try:
        predictor.use_mirroring = False  # a sample is one dropout forward, not an average of mirrored passes
        for index in range(1, counts[-1] + 1):
            logits = predictor.predict_logits_from_preprocessed_data(data).float().cpu()
            if regions:
                p = torch.sigmoid(logits)
                masks.append((p[channels] > 0.5).numpy())
            else:
                p = torch.softmax(logits, 0)
                argmax = p.argmax(0)
                masks.append(np.stack([(argmax == channel).numpy() for channel in channels]))
            total = p if total is None else total + p
            if index in counts:
                mean = total / index
                entropy = binary_entropy(mean).mean(0) if regions else normalised_entropy(mean)
                entropies[index] = float(entropy[roi].mean())
    finally:
        predictor.use_mirroring = mirroring
        set_mc_sampling(predictor.network, False)
    spacing = _preprocessed_spacing(model, data, properties)
    agreement = mc_agreement_scores(np.stack(masks), label_names, counts, spacing)
    scores = {}
    for count in counts:  # grouped by N
        scores.update({k: v for k, v in agreement.items() if k.split("_")[3] == f"n{count}"})
        scores[f"mc_mean_entropy_n{count}"] = entropies[count]
    return scores


def _prompt_rng(seed: int, case_id: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(case_id.encode())])


def _setting_prompts(foreground: np.ndarray, case_id: str, seed: int, setting) -> list:
    """Per slice of a 3-D target mask: the SlicePrompts of ``setting`` (None for empty slices)."""
    from calibnet.prompt_quality import prompt_rng, slice_prompts

    return [slice_prompts(mask, setting, prompt_rng(seed, case_id, z, setting)) for z, mask in enumerate(foreground)]


def _preprocessed_case(model: LoadedModel, case: CaseInput, prompt_seed: int, prompt_setting=None) -> tuple:
    """(network input, nnU-Net properties) of one case: nnU-Net's preprocessing, plus the prompt channels of
    prompt-guided models; SAM models get the whole case as one window, and the prompts of
    ``prompt_setting`` (a :class:`calibnet.prompt_quality.PromptSetting`) when one is given."""
    from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

    needs_label = model.trainer_class.requires_prompts
    if needs_label and case.label is None:
        raise CalibnetError(f"case {case.case_id}: {model.trainer_class.__name__} needs point prompts; give a "
                            f"label to derive them from (calib_predict --prompts-from DIR).")
    preprocessor = model.configuration_manager.preprocessor_class(verbose=False)
    data, seg, properties = preprocessor.run_case([str(p) for p in case.images],
                                                  str(case.label) if needs_label else None,
                                                  model.plans_manager, model.configuration_manager,
                                                  model.dataset_json)
    data = torch.from_numpy(data).float()
    if needs_label:
        foreground = model.prompt_foreground(seg[0])
        prompts = model.trainer_class.prompt_inputs(foreground, _prompt_rng(prompt_seed, case.case_id))
        data = torch.cat([data, prompts.to(data.dtype)], 0)
    if model.is_sam:  # whole slices in one window: SAM sees each slice entire, with its prompt
        model.predictor.configuration_manager = ConfigurationManager(
            dict(model.configuration_manager.configuration, patch_size=list(data.shape[1:])))
        model.predictor.network.prompt_override = None if prompt_setting is None else \
            [_setting_prompts(foreground, case.case_id, prompt_seed, prompt_setting)]
        model.predictor.network.set_case(case.case_id, prompt_setting)  # seeds MedSAM-U's jitter per case
    return data, properties


def head_scores(model: LoadedModel) -> dict:
    """The confidence heads' scores of the model's last prediction (empty for a model without heads)."""
    if not model.heads:
        return {}
    features = model.feature_capture.case_features()
    return {k: v for head in model.heads for k, v in head.scores(features).items()}


def predict_cases(model: LoadedModel, cases: list, output_folder: Path, save_probabilities: bool = True,
                  prompt_seed: int = 0, progress: bool = True, description: str = "predicting",
                  mc_samples: list = (), prompt_setting: str | None = None) -> dict:
    """Predict ``cases`` into ``output_folder``; returns and writes the per-case confidence scores
    (with MC-dropout scores for each N of ``mc_samples``, from max(N) stochastic passes, and the predicted
    Dice/NSD of every confidence head trained on the model). SAM models take the prompts of
    ``prompt_setting`` (prompt-quality protocol) instead of their own, predicted without mirroring since
    the prompts are drawn in the image's own orientation; the setting is written to ``prompts.json``."""
    from nnunetv2.inference.export_prediction import export_prediction_from_logits

    from calibnet.prompt_quality import parse_setting

    setting = None
    if prompt_setting is not None:
        if not model.is_sam:
            raise CalibnetError(f"--prompts applies to SAM methods; {model.trainer_class.__name__} takes no prompts "
                                f"or only its own.")
        setting = parse_setting(prompt_setting)
        model.predictor.use_mirroring = False

    output_folder = Path(output_folder)
    output_folder.mkdir(parents=True, exist_ok=True)
    export_json = model.export_dataset_json
    regions = model.plans_manager.get_label_manager(export_json).has_regions
    ending = model.dataset_json["file_ending"]
    confidence_path = output_folder / CONFIDENCE_FILENAME
    confidences = json.loads(confidence_path.read_text()) if confidence_path.is_file() else {}
    for case in tqdm(cases, desc=description, unit="case", disable=not progress):
        data, properties = _preprocessed_case(model, case, prompt_seed, setting)
        mc_scores = mc_dropout_scores(model, data, mc_samples, len(case.images), properties)
        logits = model.predictor.predict_logits_from_preprocessed_data(data).cpu()
        predicted_quality = head_scores(model)
        if hasattr(model.predictor.network, "prediction_summary"):  # medsam_u: UGMP uncertainty, UGPA decisions
            predicted_quality.update(model.predictor.network.prediction_summary())
        with tempfile.TemporaryDirectory(prefix=".partial-", dir=output_folder) as tmp:
            truncated = str(Path(tmp) / case.case_id)
            export_prediction_from_logits(logits, properties, model.configuration_manager, model.plans_manager,
                                          export_json, truncated, save_probabilities=True)
            probabilities = np.load(truncated + ".npz")["probabilities"]
            confidences[case.case_id] = {**case_confidence(probabilities, regions), **mc_scores,
                                         **predicted_quality}
            if hasattr(model.predictor.network, "prediction_summary"):  # Ū = H(ȳ): the entropy of the output
                entropy = binary_entropy(probabilities[1].astype(np.float64))
                np.savez_compressed(truncated + "_uncertainty.npz", uncertainty=entropy.astype(np.float16))
                shutil.move(truncated + "_uncertainty.npz", output_folder / f"{case.case_id}_uncertainty.npz")
            if save_probabilities:  # nnU-Net's own file, float32: float16 would round every p > 0.99976 to 1
                shutil.move(truncated + ".npz", output_folder / f"{case.case_id}.npz")
            shutil.move(truncated + ending, output_folder / f"{case.case_id}{ending}")
        atomic_write_json(confidence_path, confidences)
    if setting is not None:
        options = getattr(model.predictor.network, "options", {})
        atomic_write_json(output_folder / "prompts.json", {"setting": setting.name, "seed": prompt_seed,
                                                           **({"ugpa": options["ugpa"]} if "ugpa" in options else {})})
    return confidences


def flagged_cases(confidences: dict, threshold: float) -> dict:
    """{case: predicted Dice} of the cases whose predicted Dice (adversarial head first, else the plain
    head) is below ``threshold``."""
    flagged = {}
    for case_id, scores in confidences.items():
        dice = next((scores[f"{prefix}_predicted_dice"] for prefix in HEAD_FOLDERS.values()
                     if f"{prefix}_predicted_dice" in scores), None)
        if dice is not None and dice < threshold:
            flagged[case_id] = dice
    return flagged


def score_existing_predictions(model: LoadedModel, cases: list, output_folder: Path, progress: bool = True,
                               description: str = "scoring") -> dict:
    """Add the confidence heads' scores of ``cases`` to the ``confidence.json`` of an existing prediction
    folder, leaving the segmentations, probabilities and other scores as they are."""
    confidence_path = Path(output_folder) / CONFIDENCE_FILENAME
    if not confidence_path.is_file():
        raise CalibnetError(f"{confidence_path} is missing: predict the base run first (calib_train ... "
                            f"--predict-only).")
    confidences = json.loads(confidence_path.read_text())
    head_prefixes = tuple(f"{prefix}_" for prefix in HEAD_FOLDERS.values())
    for case in tqdm(cases, desc=description, unit="case", disable=not progress):
        data, _ = _preprocessed_case(model, case, 0)
        model.predictor.predict_logits_from_preprocessed_data(data)
        entry = {k: v for k, v in confidences.get(case.case_id, {}).items() if not k.startswith(head_prefixes)}
        confidences[case.case_id] = {**entry, **head_scores(model)}
    atomic_write_json(confidence_path, confidences)
    return confidences


def raw_case_inputs(raw_dataset_folder: Path, case_ids: list, dataset_json: dict) -> list:
    """CaseInput for training cases of a raw dataset (images from imagesTr, labels from labelsTr)."""
    ending = dataset_json["file_ending"]
    cases = []
    for case_id in case_ids:
        images = tuple(channel_files(raw_dataset_folder / "imagesTr", case_id, dataset_json))
        missing = [p for p in images if not p.is_file()]
        if missing:
            raise CalibnetError(f"{missing[0]} is missing; the raw dataset no longer matches calib_splits.json.")
        cases.append(CaseInput(case_id, images, raw_dataset_folder / "labelsTr" / f"{case_id}{ending}"))
    return cases


def predict_run_splits(run_folder: Path, raw_root: Path, preprocessed_root: Path, device: str = "cpu",
                       use_mirroring: bool = True, progress: bool = True, mc_samples: list = (),
                       prompt_setting: str | None = None, ugpa: bool = True) -> dict:
    """Predict the val (source) and test (target) cases of a run's fold into ``predictions/{val,test}``
    (``predictions/prompts_<SETTING>/{val,test}`` with a prompt-quality setting).

    ``ugpa=False`` predicts a medsam_u run with UGMP only, into ``prompts_<SETTING>_noUGPA``.
    Returns {"val": folder, "test": folder}.
    """
    from calibnet.planners.splits import get_fold, load_calib_splits

    from calibnet.prompt_quality import parse_setting

    run_folder = Path(run_folder)
    record = read_run(run_folder)
    if prompt_setting is not None:
        parse_setting(prompt_setting)  # a bad name fails before anything is removed
        if record.get("backbone") is None:
            raise CalibnetError(f"--prompts applies to SAM methods, not {record['spec']['method']}.")
    spec = record["spec"]
    dataset_name = record["dataset_name"]
    fold = get_fold(load_calib_splits(Path(preprocessed_root) / dataset_name), spec["split"], spec["fold"])
    model = load_model(run_folder, device, use_mirroring)
    prediction_set = prompt_setting
    if not ugpa:
        if prompt_setting is None or "ugpa" not in getattr(model.predictor.network, "options", {}):
            raise CalibnetError("--no-ugpa at prediction time applies to medsam_u with --prompts SETTING (train with "
                                "--no-ugpa for the run's own predictions).")
        model.predictor.network.options["ugpa"] = False
        prediction_set = f"{prompt_setting}_{NO_UGPA}"
    written = {}
    for role in ROLES:
        cases = raw_case_inputs(Path(raw_root) / dataset_name, fold[role], model.dataset_json)
        folder = prediction_folder(run_folder, role, prediction_set)
        if folder.exists():
            shutil.rmtree(folder)  # a re-prediction replaces the old one entirely
        predict_cases(model, cases, folder, prompt_seed=spec["seed"], progress=progress,
                      description=f"predicting {role} ({len(cases)} cases)", mc_samples=mc_samples,
                      prompt_setting=prompt_setting)
        written[role] = folder
    return written


def score_run_splits(run_folder: Path, raw_root: Path, preprocessed_root: Path, device: str = "cpu",
                     progress: bool = True) -> dict:
    """Add the scores of the run's confidence heads to its val and test predictions (predicting them first
    where they do not exist yet). Returns {"val": folder, "test": folder}."""
    from calibnet.planners.splits import get_fold, load_calib_splits

    run_folder = Path(run_folder)
    folders = {role: prediction_folder(run_folder, role) for role in ROLES}
    if not all((f / CONFIDENCE_FILENAME).is_file() for f in folders.values()):
        return predict_run_splits(run_folder, raw_root, preprocessed_root, device, progress=progress)
    record = read_run(run_folder)
    spec = record["spec"]
    fold = get_fold(load_calib_splits(Path(preprocessed_root) / record["dataset_name"]), spec["split"], spec["fold"])
    model = load_model(run_folder, device, use_mirroring=False)  # heads read the unmirrored pass only
    if not model.heads:
        raise CalibnetError(f"{run_folder} has no trained confidence head; train one with calib_train ... "
                            f"confidence_head --base {spec['method']}.")
    for role, folder in folders.items():
        cases = raw_case_inputs(Path(raw_root) / record["dataset_name"], fold[role], model.dataset_json)
        score_existing_predictions(model, cases, folder, progress, f"confidence heads on {role} ({len(cases)} cases)")
    return folders


def folder_case_inputs(input_folder: Path, dataset_json: dict, prompts_folder: Path | None = None) -> list:
    """CaseInput for every CASE_XXXX image set in ``input_folder`` (nnU-Net naming); labels from
    ``prompts_folder/CASE<ending>`` when given."""
    ending = dataset_json["file_ending"]
    n_channels = len(dataset_json["channel_names"])
    input_folder = Path(input_folder)
    case_ids = sorted({p.name[:-len(ending) - 5] for p in input_folder.glob(f"*_[0-9][0-9][0-9][0-9]{ending}")})
    if not case_ids:
        raise CalibnetError(f"{input_folder} holds no images named CASE_0000{ending}.")
    cases = []
    for case_id in case_ids:
        images = tuple(channel_files(input_folder, case_id, dataset_json))
        missing = [p for p in images if not p.is_file()]
        if missing:
            raise CalibnetError(f"case {case_id}: {missing[0]} is missing; the model takes {n_channels} channel(s) "
                                f"({', '.join(dataset_json['channel_names'].values())}).")
        label = None
        if prompts_folder is not None:
            label = Path(prompts_folder) / f"{case_id}{ending}"
            if not label.is_file():
                raise CalibnetError(f"case {case_id}: {label} is missing (--prompts-from needs one label per case).")
        cases.append(CaseInput(case_id, images, label))
    return cases
