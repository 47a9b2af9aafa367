"""One calib_train request from start to end: the method it names (SafeClick ablations and backbone variants
included), a network or a confidence head trained, then the fold's val (source) and test (target) cases
predicted with the run's own prompts and with each prompt-quality setting asked for. Progress goes to ``log``
line by line, as calib_train prints it; the experiment grid runs the same step per cell.
"""
from __future__ import annotations

from dataclasses import replace

from calibnet.inference import predict_run_splits, score_run_splits
from calibnet.launch.options import TrainRequest, TrainResult, check_head_options, check_prediction_options
from calibnet.launch.training_run import base_run_of, default_device, locate_run, train, train_confidence_head
from calibnet.methods import get_method, method_variant
from calibnet.paths import DataRoots
from calibnet.runs import CONFIDENCE_FILENAME, read_run


def train_and_predict(request: TrainRequest, roots: DataRoots, log=print) -> TrainResult:
    """Do what ``calib_train`` does for ``request``; every flag is checked before anything is written."""
    method = method_variant(request.method, request.on_backbone, request.ablations)
    if method != request.method:
        flags = ([f"--backbone {request.on_backbone}"] if request.on_backbone else []) + \
            [f"--no-{part}" for part in request.ablations]
        kind = "a SafeClick ablation" if request.ablations else f"{request.method} on {request.on_backbone}"
        log(f"{' '.join(flags)}: method {method} ({kind})")
    request = replace(request, method=method, ablations=(), on_backbone=None,
                      device=request.device or default_device())
    check_head_options(get_method(method), request.head)
    if get_method(method).trains_head:
        return _train_head(request, roots, log)
    check_prediction_options(request)
    return _train_network(request, roots, log)


def _train_network(request: TrainRequest, roots: DataRoots, log) -> TrainResult:
    prediction = request.prediction
    if prediction.predict_only:
        folder = locate_run(request.spec, roots.preprocessed, roots.results)
    else:
        folder = train(request.spec, roots.preprocessed, roots.results, request.epochs, request.iterations_per_epoch,
                       request.device, request.continue_training, request.num_workers, log=log, loss=request.loss,
                       backbone=request.backbone, network=request.network)
        note = read_run(folder).get("note")
        log(f"trained {request.method}: {folder}" + (f" ({note})" if note else ""))
    result = TrainResult(request.method, folder, trained=not prediction.predict_only)
    if not (prediction.predict_only and prediction.prompt_settings):  # the method's own prompts
        written = predict_run_splits(folder, roots.raw, roots.preprocessed, request.device,
                                     use_mirroring=prediction.use_mirroring,
                                     mc_samples=sorted(set(prediction.mc_samples)))
        result.predictions[None] = written
        for role, predictions in written.items():
            log(f"  {role} predictions: {predictions}")
    # without training, --no-ugpa predicts the prompt settings with UGMP only; in training it is a network option
    ugpa = not (prediction.predict_only and request.network.ugpa is False)
    for setting in prediction.prompt_settings:
        written = predict_run_splits(folder, roots.raw, roots.preprocessed, request.device, prompt_setting=setting,
                                     ugpa=ugpa)
        result.predictions[setting] = written
        for role, predictions in written.items():
            log(f"  {role} predictions with prompts {setting}: {predictions}")
    return result


def _train_head(request: TrainRequest, roots: DataRoots, log) -> TrainResult:
    """Train a confidence head on the base run (unless --predict-only), then score the base run's val and test
    predictions with it."""
    spec, base = request.spec, request.head.base
    base_folder = base_run_of(spec, base, roots.preprocessed, roots.results)[0]
    folder = None
    if not request.prediction.predict_only:
        folder = train_confidence_head(spec, request.head, roots.preprocessed, roots.results, request.epochs,
                                       request.iterations_per_epoch, request.device, request.num_workers, log=log)
        log(f"trained confidence head: {folder}")
    written = score_run_splits(base_folder, roots.raw, roots.preprocessed, request.device)
    for role, predictions in written.items():
        log(f"  {role} predictions of {base} with predicted Dice/NSD: {predictions / CONFIDENCE_FILENAME}")
    return TrainResult(spec.method, folder, trained=folder is not None, predictions={None: written})
