"""The cases a prediction reads: their image files (a raw dataset's training cases, or a folder of nnU-Net
named images), and each case made ready for the network — nnU-Net's preprocessing, the prompt channels of
prompt-guided models, and the per-slice prompts of a prompt-quality setting for SAM models.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from calibnet.errors import CalibnetError
from calibnet.inference.model_loading import LoadedModel
from calibnet.paths import channel_files
from calibnet.prompt_quality import PromptSetting, prompt_rng, slice_prompts


@dataclass(frozen=True)
class CaseInput:
    case_id: str
    images: tuple  # one file per channel
    label: Path | None = None  # ground truth, needed only for prompt-guided models


@dataclass(frozen=True)
class PreparedCase:
    """One case as the network takes it (see :meth:`LoadedModel.predict_logits`)."""
    case_id: str
    data: torch.Tensor  # nnU-Net's preprocessed image channels, then the prompt channels of prompt-guided models
    properties: dict  # nnU-Net's preprocessing properties, to export the prediction at the original geometry
    prompt_sets: tuple | None = None  # SAM with a prompt-quality setting: SlicePrompts (or None) per slice
    setting: PromptSetting | None = None  # that setting; None: the model's own prompts


def _prompt_rng(seed: int, case_id: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(case_id.encode())])


def _setting_prompts(foreground: np.ndarray, case_id: str, seed: int, setting: PromptSetting) -> tuple:
    """Per slice of a 3-D target mask: the SlicePrompts of ``setting`` (None for empty slices)."""
    return tuple(slice_prompts(mask, setting, prompt_rng(seed, case_id, z, setting))
                 for z, mask in enumerate(foreground))


def prepare_case(model: LoadedModel, case: CaseInput, prompt_seed: int,
                 prompt_setting: PromptSetting | None = None) -> PreparedCase:
    """One case through nnU-Net's preprocessing, plus the prompt channels of prompt-guided models (drawn from
    the label with ``prompt_seed``) and, for SAM models given a ``prompt_setting``, that setting's prompts."""
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
    if not needs_label:
        return PreparedCase(case.case_id, data, properties)
    foreground = model.prompt_foreground(seg[0])
    prompts = model.prompt_inputs(foreground, _prompt_rng(prompt_seed, case.case_id))
    data = torch.cat([data, prompts.to(data.dtype)], 0)
    prompt_sets = None
    if model.is_sam and prompt_setting is not None:
        prompt_sets = _setting_prompts(foreground, case.case_id, prompt_seed, prompt_setting)
    return PreparedCase(case.case_id, data, properties, prompt_sets, prompt_setting)


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
