"""Every check calib_train makes of a request before it writes anything, without training: the method (and
the variant its flags select), each flag group against what the method declares, a confidence head's
``--base`` method, the prompt settings, the preprocessed dataset and configuration, and the fold. Whether a
head's base run is trained is a separate check (:func:`check_base_run`): ``calib_experiment`` makes it only
for bases that its grid does not train itself. ``calib_experiment`` runs these on every cell of a grid
before the first one starts. The planners (pandas), prompt settings (scipy) and the training run (torch) are imported when a check
runs, so that importing ``calibnet.api`` stays cheap.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from calibnet.errors import CalibnetError
from calibnet.launch.options import (TrainRequest, check_backbone_options, check_head_options, check_loss_options,
                                     check_network_options, check_num_gpus, check_prediction_options)
from calibnet.methods import METHODS, get_method, method_variant
from calibnet.runs import CALIB_PLANS_NAME, RunSpec


def check_request(request: TrainRequest, preprocessed_root: Path) -> str:
    """Refuse what calib_train would refuse for ``request`` (with its messages); returns the method it trains
    (a SafeClick ablation or backbone variant where ``--backbone``/``--no-e1`` ask for one)."""
    from calibnet.planners.splits import get_fold, load_calib_splits
    from calibnet.prompt_quality import parse_setting

    alias = method_variant(request.method, request.on_backbone, request.ablations)
    method = get_method(alias)
    check_head_options(method, request.head)
    check_num_gpus(method, request.num_gpus, request.device, request.prediction.predict_only)
    if method.trains_head:
        check_head_base(request.head.base)
    else:
        check_prediction_options(replace(request, method=alias))
    check_loss_options(method, request.loss)
    check_backbone_options(method, request.backbone)
    check_network_options(method, request.network)
    for setting in request.prediction.prompt_settings:
        parse_setting(setting)
        if not method.uses_sam:
            raise CalibnetError(f"--prompts applies to SAM methods, not {alias}.")
    check_dataset(request.dataset_id, request.configuration, preprocessed_root)
    dataset_folder = preprocessed_dataset(preprocessed_root, request.dataset_id)
    get_fold(load_calib_splits(dataset_folder), request.split, request.fold,
             where=dataset_folder / "calib_splits.json")
    return alias


def _reads_a_unet(method) -> bool:
    """A confidence head attaches to an nnU-Net U-Net without prompt inputs."""
    return not (method.trains_head or method.uses_sam or method.trainer_class().requires_prompts)


def check_head_base(base: str) -> None:
    """A confidence head's ``--base``: a method whose network a head can read (as calib_train refuses it)."""
    if not _reads_a_unet(get_method(base)):
        raise CalibnetError(f"--base {base}: a confidence head attaches to an nnU-Net U-Net without prompt inputs; "
                            f"choose one of {', '.join(m.alias for m in METHODS.values() if _reads_a_unet(m))}.")


def check_base_run(spec: RunSpec, base: str, preprocessed_root: Path, results_root: Path) -> Path:
    """The finished run of ``base`` that a confidence head of ``spec`` (same dataset, configuration, split, fold
    and seed) is trained on: its folder, or calib_train's message saying what to train first."""
    from calibnet.launch.training_run import base_run_of

    return base_run_of(spec, base, preprocessed_root, results_root)[0]


def preprocessed_dataset(preprocessed_root: Path, dataset_id: int) -> Path:
    """The preprocessed folder of a dataset (with its CalibPlans), or the command that makes it."""
    from calibnet.launch.training_run import find_preprocessed_dataset

    return find_preprocessed_dataset(preprocessed_root, dataset_id)


def check_dataset(dataset_id: int, configuration: str, preprocessed_root: Path) -> Path:
    """The preprocessed dataset folder, once its plans hold ``configuration`` and its data is preprocessed;
    else the command that makes it."""
    folder = preprocessed_dataset(preprocessed_root, dataset_id)
    plans_file = folder / f"{CALIB_PLANS_NAME}.json"
    configurations = json.loads(plans_file.read_text())["configurations"]
    if configuration not in configurations:
        raise CalibnetError(f"configuration {configuration} is not in {plans_file}; available: "
                            f"{', '.join(configurations)}.")
    data = configurations[configuration].get("data_identifier", f"{CALIB_PLANS_NAME}_{configuration}")
    if not (folder / data).is_dir():
        raise CalibnetError(f"{folder / data} is missing: preprocess it with calib_plan_and_preprocess -d "
                            f"{dataset_id} -c {configuration}.")
    return folder


def split_folds(preprocessed_folder: Path, split: str) -> int:
    """How many folds the ``split`` family of the dataset's calib_splits.json has (an error when none)."""
    from calibnet.planners.splits import get_fold, load_calib_splits

    where = Path(preprocessed_folder) / "calib_splits.json"
    get_fold(load_calib_splits(preprocessed_folder), split, 0, where=where)
    return len(load_calib_splits(preprocessed_folder)[split]["folds"])
