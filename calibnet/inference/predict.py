"""Prediction with a trained calibnet model, through nnU-Net's own preprocessing, sliding-window predictor
and export, case by case: segmentation (.nii.gz), softmax probabilities (.npz, key ``probabilities``,
float32 as nnU-Net writes them, (C, z, y, x) at the original geometry) and ``confidence.json``; and, as nnU-Net's
predictor does, CASE.pkl beside each .npz and the folder's dataset.json and plans.json, for nnU-Net's tools only.

Each case's files are written in a temporary folder and moved into place only when complete. The parts:
``model_loading`` (the run as a model), ``cases`` (case listing and preparation with prompts), ``scores``
(confidence, MC-dropout and head scores); this module runs them over cases and over a run's val/test split.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
from tqdm import tqdm

from calibnet.errors import CalibnetError
from calibnet.files import atomic_output_dir, atomic_write_json
from calibnet.inference.cases import PreparedCase, prepare_case, raw_case_inputs
from calibnet.inference.model_loading import LoadedModel, load_model
from calibnet.inference.scores import check_mc_sampling, head_scores, mc_dropout_scores
from calibnet.metrics.confidence_scores import case_confidence
from calibnet.metrics.entropy import binary_entropy
from calibnet.networks.confidence_head import HEAD_FOLDERS
from calibnet.prompt_quality import parse_setting
from calibnet.runs import (CONFIDENCE_FILENAME, NNUNET_CASE_PROPERTIES_ENDING, NNUNET_FOLDER_FILES, NO_UGPA, ROLES,
                           prediction_folder, read_run)


def _export_case(model: LoadedModel, case: PreparedCase, logits, output_folder: Path, scores: dict,
                 save_probabilities: bool, regions: bool) -> dict:
    """Write one case's segmentation (and probabilities, and uncertainty map where the network makes one)
    through nnU-Net's export; returns its confidence.json entry: the probabilities' scores, then ``scores``."""
    from nnunetv2.inference.export_prediction import export_prediction_from_logits

    ending = model.dataset_json["file_ending"]
    with tempfile.TemporaryDirectory(prefix=".partial-", dir=output_folder) as tmp:
        truncated = str(Path(tmp) / case.case_id)
        export_prediction_from_logits(logits, case.properties, model.configuration_manager, model.plans_manager,
                                      model.export_dataset_json, truncated, save_probabilities=True)
        probabilities = np.load(truncated + ".npz")["probabilities"]
        entry = {**case_confidence(probabilities, regions), **scores}
        if model.writes_uncertainty_map:  # Ū = H(ȳ): the entropy of the output, in bits
            entropy = binary_entropy(probabilities[1].astype(np.float64))
            np.savez_compressed(truncated + "_uncertainty.npz", uncertainty=entropy.astype(np.float16))
            shutil.move(truncated + "_uncertainty.npz", output_folder / f"{case.case_id}_uncertainty.npz")
        if save_probabilities:  # nnU-Net's own file, float32: float16 would round every p > 0.99976 to 1
            shutil.move(truncated + ".npz", output_folder / f"{case.case_id}.npz")
            properties = f"{case.case_id}{NNUNET_CASE_PROPERTIES_ENDING}"  # for nnU-Net's tools only (runs.py)
            shutil.move(Path(tmp) / properties, output_folder / properties)
        shutil.move(truncated + ending, output_folder / f"{case.case_id}{ending}")
    return entry


def write_nnunet_folder_files(output_folder: Path, model: LoadedModel) -> None:
    """The dataset.json and plans.json nnU-Net's predictor writes beside its predictions (``runs.NNUNET_FOLDER_FILES``):
    the labels the model predicts and its plans, which nnU-Net's tools (nnUNetv2_ensemble) read from the folder."""
    for name, content in zip(NNUNET_FOLDER_FILES, (model.export_dataset_json, model.plans_manager.plans)):
        atomic_write_json(Path(output_folder) / name, content)


def predict_cases(model: LoadedModel, cases: list, output_folder: Path, save_probabilities: bool = True,
                  prompt_seed: int = 0, progress: bool = True, description: str = "predicting",
                  mc_samples: list = (), prompt_setting: str | None = None) -> dict:
    """Predict ``cases`` into ``output_folder``; returns and writes the per-case confidence scores
    (with MC-dropout scores for each N of ``mc_samples``, from max(N) stochastic passes, the predicted
    Dice/NSD of every confidence head trained on the model, and the network's own entries). SAM models take
    the prompts of ``prompt_setting`` (prompt-quality protocol) instead of their own, predicted without
    mirroring since the prompts are drawn in the image's own orientation; the setting is written to
    ``prompts.json``."""
    setting = None
    if prompt_setting is not None:
        if not model.is_sam:
            raise CalibnetError(f"--prompts applies to SAM methods; {model.trainer_class.__name__} takes no prompts "
                                f"or only its own.")
        setting = parse_setting(prompt_setting)
        model.predictor.use_mirroring = False

    output_folder = Path(output_folder)
    output_folder.mkdir(parents=True, exist_ok=True)
    write_nnunet_folder_files(output_folder, model)
    regions = model.plans_manager.get_label_manager(model.export_dataset_json).has_regions
    confidence_path = output_folder / CONFIDENCE_FILENAME
    confidences = json.loads(confidence_path.read_text()) if confidence_path.is_file() else {}
    for case in tqdm(cases, desc=description, unit="case", disable=not progress):
        prepared = prepare_case(model, case, prompt_seed, setting)
        mc_scores = mc_dropout_scores(model, prepared.data, mc_samples, len(case.images), prepared.properties)
        logits = model.predict_logits(prepared).cpu()
        scores = {**mc_scores, **head_scores(model, logits), **model.prediction_summary()}
        confidences[case.case_id] = _export_case(model, prepared, logits, output_folder, scores, save_probabilities,
                                                 regions)
        atomic_write_json(confidence_path, confidences)
    if setting is not None:
        atomic_write_json(output_folder / "prompts.json", {"setting": setting.name, "seed": prompt_seed,
                                                           **model.prediction_settings()})
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
    scored = {}
    for case in tqdm(cases, desc=description, unit="case", disable=not progress):
        scored[case.case_id] = head_scores(model, model.predict_logits(prepare_case(model, case, 0)))
    # read again now (another head may have written its scores meanwhile); replace only the scores of these heads
    confidences = json.loads(confidence_path.read_text())
    replaced = tuple(f"{head.prefix}_" for head in model.heads)
    for case_id, scores in scored.items():
        entry = {k: v for k, v in confidences.get(case_id, {}).items() if not (replaced and k.startswith(replaced))}
        confidences[case_id] = {**entry, **scores}
    atomic_write_json(confidence_path, confidences)
    return confidences


def _run_fold(record: dict, preprocessed_root: Path) -> dict:
    """The run's fold of calib_splits.json: {"train", "val", "test"} case ids."""
    from calibnet.planners.splits import get_fold, load_calib_splits

    spec = record["spec"]
    return get_fold(load_calib_splits(Path(preprocessed_root) / record["dataset_name"]), spec["split"], spec["fold"])


def predict_run_splits(run_folder: Path, raw_root: Path, preprocessed_root: Path, device: str = "cpu",
                       use_mirroring: bool = True, progress: bool = True, mc_samples: list = (),
                       prompt_setting: str | None = None, ugpa: bool = True) -> dict:
    """Predict the val (source) and test (target) cases of a run's fold into ``predictions/{val,test}``
    (``predictions/prompts_<SETTING>/{val,test}`` with a prompt-quality setting).

    ``ugpa=False`` predicts a medsam_u run with UGMP only, into ``prompts_<SETTING>_noUGPA``. The set's old folders
    are removed first; each role is predicted into a temporary sibling renamed into place at its end, so a killed
    prediction leaves no role folder (``runs.prediction_set_complete``). Returns {"val": folder, "test": folder}.
    """
    run_folder = Path(run_folder)
    record = read_run(run_folder)
    if prompt_setting is not None:
        parse_setting(prompt_setting)  # a bad name fails before anything is removed
        if record.get("backbone") is None:
            raise CalibnetError(f"--prompts applies to SAM methods, not {record['spec']['method']}.")
    fold = _run_fold(record, preprocessed_root)
    model = load_model(run_folder, device, use_mirroring, network_options=None if ugpa else {"ugpa": False},
                       preprocessed_root=preprocessed_root)
    prediction_set = prompt_setting
    if not ugpa:
        if prompt_setting is None or "ugpa" not in model.prediction_settings():  # the network has no UGPA
            raise CalibnetError("--no-ugpa at prediction time applies to medsam_u with --prompts SETTING (train with "
                                "--no-ugpa for the run's own predictions).")
        prediction_set = f"{prompt_setting}_{NO_UGPA}"
    if mc_samples:
        check_mc_sampling(model)  # a refused request leaves the run's predictions as they were
    for role in ROLES:  # a re-prediction replaces the old one entirely: never old val beside new test
        if prediction_folder(run_folder, role, prediction_set).exists():
            shutil.rmtree(prediction_folder(run_folder, role, prediction_set))
    written = {}
    for role in ROLES:
        cases = raw_case_inputs(Path(raw_root) / record["dataset_name"], fold[role], model.dataset_json)
        folder = prediction_folder(run_folder, role, prediction_set)
        with atomic_output_dir(folder, overwrite=True) as partial:  # the folder appears once every case is in it
            predict_cases(model, cases, partial, prompt_seed=record["spec"]["seed"], progress=progress,
                          description=f"predicting {role} ({len(cases)} cases)", mc_samples=mc_samples,
                          prompt_setting=prompt_setting)
        written[role] = folder
    return written


def score_run_splits(run_folder: Path, raw_root: Path, preprocessed_root: Path, device: str = "cpu",
                     progress: bool = True) -> dict:
    """Add the scores of the run's confidence heads to its val and test predictions (predicting them first
    where they do not exist yet). Returns {"val": folder, "test": folder}."""
    run_folder = Path(run_folder)
    folders = {role: prediction_folder(run_folder, role) for role in ROLES}
    if not all((f / CONFIDENCE_FILENAME).is_file() for f in folders.values()):
        return predict_run_splits(run_folder, raw_root, preprocessed_root, device, progress=progress)
    record = read_run(run_folder)
    fold = _run_fold(record, preprocessed_root)
    model = load_model(run_folder, device, use_mirroring=False,  # heads read the unmirrored pass only
                       preprocessed_root=preprocessed_root)
    if not model.heads:
        raise CalibnetError(f"{run_folder} has no trained confidence head; train one with calib_train ... "
                            f"confidence_head --base {record['spec']['method']}.")
    for role, folder in folders.items():
        cases = raw_case_inputs(Path(raw_root) / record["dataset_name"], fold[role], model.dataset_json)
        score_existing_predictions(model, cases, folder, progress, f"confidence heads on {role} ({len(cases)} cases)")
    return folders
