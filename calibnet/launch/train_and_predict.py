"""One calib_train request from start to end: the method it names (SafeClick ablations and backbone variants
included), a network or a confidence head trained, then the fold's val (source) and test (target) cases
predicted with the run's own prompts and with each prompt-quality setting asked for. Progress goes to ``log``
line by line, as calib_train prints it; the experiment grid runs the same step per cell.

Each step's wall-clock seconds go into the run's calibnet_run.json under ``"seconds"`` (format in
``calibnet.runs.RunRecord``), written as soon as the step has finished:

- ``training``: the training call. Training writes a fresh record, so the entry starts afresh and what was
  measured for the previous model (its predictions, prompt-setting predictions, heads) goes with it;
  ``--continue`` adds the attempt to the training seconds recorded before (an attempt that never finished
  recorded nothing, so its seconds are not counted; a run recorded before seconds were kept starts at 0).
- ``prediction``: the val and test predictions with the run's own prompts, replaced by each new prediction
  (``--predict-only`` keeps ``training``).
- ``prediction_prompts``: {prediction set: seconds} of each prompt-quality setting (``3B0.5``,
  ``3B0.5_noUGPA``), each replaced when that set is predicted again.
- ``confidence_heads``: {head folder: {"training", "scoring"}} in the *base* run's record (a head has no
  record of its own): the head's training call, and the scoring of the base's val and test predictions that
  follows it (that pass scores every head of the base, and predicts the base first where its predictions
  are missing). ``--predict-only`` replaces ``scoring`` and keeps ``training``.
"""
from __future__ import annotations

import time
from dataclasses import replace

from calibnet.errors import UsageError
from calibnet.files import atomic_output_dir, remove_stale_partials
from calibnet.inference import predict_run_splits, score_run_splits
from calibnet.launch.options import (TrainRequest, TrainResult, check_head_options, check_num_gpus,
                                     check_prediction_options, check_recorded_sam_prompt)
from calibnet.launch.interruption import stop_on_sigterm
from calibnet.launch.run_lock import run_lock
from calibnet.launch.training_run import (base_run_of, default_device, locate_run, resume_or_refuse, run_training_job,
                                          train_confidence_head, training_job)
from calibnet.methods import get_method, method_variant
from calibnet.paths import DataRoots
from calibnet.runs import CONFIDENCE_FILENAME, RUN_FILENAME, read_run, update_run


def train_and_predict(request: TrainRequest, roots: DataRoots, log=print) -> TrainResult:
    """Do what ``calib_train`` does for ``request``; every flag is checked before anything is written."""
    method = method_variant(request.method, request.on_backbone, request.ablations)
    if method != request.method:
        flags = ([f"--backbone {request.on_backbone}"] if request.on_backbone else []) + \
            [f"--no-{part}" for part in request.ablations]
        kind = "a SafeClick ablation" if request.ablations else f"{request.method} on {request.on_backbone}"
        log(f"{' '.join(flags)}: method {method} ({kind})")
    check_num_gpus(get_method(method), request.num_gpus, request.device, request.prediction.predict_only)
    request = replace(request, method=method, ablations=(), on_backbone=None,
                      device=request.device or default_device())
    check_head_options(get_method(method), request.head)
    if request.overwrite and (request.continue_training or request.prediction.predict_only):
        raise UsageError(f"--overwrite trains the run afresh; it does not go with "
                         f"{'--continue' if request.continue_training else '--predict-only'}.")
    if get_method(method).trains_head:
        return _train_head(request, roots, log)
    check_prediction_options(request)
    return _train_network(request, roots, log)


def _train_network(request: TrainRequest, roots: DataRoots, log) -> TrainResult:
    """Train (unless --predict-only) and predict, holding the run's lock throughout (after every check)."""
    prediction = request.prediction
    folder = locate_run(request.spec, roots.preprocessed, roots.results)
    if prediction.predict_only:
        check_recorded_sam_prompt(get_method(request.method), read_run(folder) if (folder / RUN_FILENAME).is_file()
                                  else None, request.backbone.sam_prompt, predict_only=True)
    else:
        job = training_job(request.spec, roots.preprocessed, roots.results, request.epochs,
                           request.iterations_per_epoch, request.device, request.continue_training,
                           request.num_workers, loss=request.loss, backbone=request.backbone,
                           network=request.network, num_gpus=request.num_gpus)
    with stop_on_sigterm(), run_lock(folder, log):
        if not prediction.predict_only:
            _train_in(folder, job, request, log)
        return _predict(folder, request, roots, log)


def _train_in(folder, job, request: TrainRequest, log) -> None:
    """Train ``job`` for the run in ``folder``: resume an interrupted run, refuse a finished one unless --overwrite;
    with --overwrite, train in a sibling folder that replaces ``folder`` once trained (on error, or when stopped, the
    sibling is removed and the old run kept)."""
    removed = remove_stale_partials(folder)
    if removed:
        log(f"removed {len(removed)} unfinished --overwrite training(s) of a process that has ended: "
            f"{', '.join(p.name for p in removed)}")
    job, beside = resume_or_refuse(job, folder, request.overwrite, log)
    before = _recorded_training_seconds(folder) if job.continue_training else 0.0
    if not beside:
        seconds, note = _timed_training(job, folder, before, log)
    else:
        with atomic_output_dir(folder, overwrite=True) as staging:
            seconds, note = _timed_training(replace(job, folder=staging), staging, before, log)
        log(f"--overwrite: the new run has replaced the previous one in {folder}")
    log(f"trained {request.method}: {folder} ({seconds:.1f} s" + (f"; {note})" if note else ")"))


def _timed_training(job, folder, before: float, log) -> tuple[float, str | None]:
    """Train ``job`` (into ``folder``) and record its training seconds (plus ``before``) in its record; returns them
    and the record's note."""
    start = time.perf_counter()
    run_training_job(job, log)
    seconds = before + time.perf_counter() - start
    return seconds, update_run(folder, lambda r: r.__setitem__("seconds", {"training": seconds})).get("note")


def _predict(folder, request: TrainRequest, roots: DataRoots, log) -> TrainResult:
    """Predict the run's val and test cases with its own prompts and with each prompt-quality setting asked for."""
    prediction = request.prediction
    result = TrainResult(request.method, folder, trained=not prediction.predict_only)
    if not (prediction.predict_only and prediction.prompt_settings):  # the method's own prompts
        start = time.perf_counter()
        written = predict_run_splits(folder, roots.raw, roots.preprocessed, request.device,
                                     use_mirroring=prediction.use_mirroring,
                                     mc_samples=sorted(set(prediction.mc_samples)))
        _record_seconds(folder, ("prediction",), time.perf_counter() - start)
        result.predictions[None] = written
        for role, predictions in written.items():
            log(f"  {role} predictions: {predictions}")
    # without training, --no-ugpa predicts the prompt settings with UGMP only; in training it is a network option
    ugpa = not (prediction.predict_only and request.network.ugpa is False)
    for setting in prediction.prompt_settings:
        start = time.perf_counter()
        written = predict_run_splits(folder, roots.raw, roots.preprocessed, request.device, prompt_setting=setting,
                                     ugpa=ugpa)
        prediction_set = written["val"].parent.name[len("prompts_"):]  # the setting, with _noUGPA where it applies
        _record_seconds(folder, ("prediction_prompts", prediction_set), time.perf_counter() - start)
        result.predictions[setting] = written
        for role, predictions in written.items():
            log(f"  {role} predictions with prompts {setting}: {predictions}")
    return result


def _recorded_training_seconds(folder) -> float:
    """The training seconds in the record of the run that ``--continue`` resumes (0 when it has none)."""
    if not (folder / RUN_FILENAME).is_file():
        return 0.0
    return float((read_run(folder).get("seconds") or {}).get("training", 0.0))


def _record_seconds(folder, keys: tuple, seconds: float) -> None:
    """Set ``record["seconds"][keys[0]][keys[1]]…`` of the run in ``folder`` to ``seconds`` (other entries
    kept)."""
    def change(record):
        entry = record.setdefault("seconds", {})
        for key in keys[:-1]:
            entry = entry.setdefault(key, {})
        entry[keys[-1]] = float(seconds)

    update_run(folder, change)


def _train_head(request: TrainRequest, roots: DataRoots, log) -> TrainResult:
    """Train a confidence head on the base run (unless --predict-only), then score the base run's val and test
    predictions with it."""
    from calibnet.networks.confidence_head import head_folder

    spec, base = request.spec, request.head.base
    base_folder = base_run_of(spec, base, roots.preprocessed, roots.results)[0]
    head = head_folder(base_folder, request.head.adversarial).name
    folder = None
    if not request.prediction.predict_only:
        start = time.perf_counter()
        folder = train_confidence_head(spec, request.head, roots.preprocessed, roots.results, request.epochs,
                                       request.iterations_per_epoch, request.device, request.num_workers, log=log)
        seconds = time.perf_counter() - start
        # a new head: its previous scoring seconds belong to the head it replaces
        update_run(base_folder, lambda r: r.setdefault("seconds", {}).setdefault("confidence_heads", {})
                   .__setitem__(head, {"training": seconds}))
        log(f"trained confidence head: {folder} ({seconds:.1f} s)")
    start = time.perf_counter()
    written = score_run_splits(base_folder, roots.raw, roots.preprocessed, request.device)
    _record_seconds(base_folder, ("confidence_heads", head, "scoring"), time.perf_counter() - start)
    for role, predictions in written.items():
        log(f"  {role} predictions of {base} with predicted Dice/NSD: {predictions / CONFIDENCE_FILENAME}")
    return TrainResult(spec.method, folder, trained=folder is not None, predictions={None: written})
