"""What each command does, callable from Python: ``calib_train`` is :func:`train`, ``calib_predict``
:func:`predict`, ``calib_evaluate`` :func:`evaluate`, ``calib_plan_and_preprocess`` :func:`plan_and_preprocess`,
``calib_convert`` :func:`convert_synthetic`, :func:`convert_corrupt` and :func:`convert_public`,
``calib_experiment`` :func:`experiment`, ``calib_export`` :func:`export`.

The console scripts (``calibnet/cli/``) only parse flags into these calls and print what they return (the
``lines``/``warnings`` of a result, or ``log`` while a long command runs). Every function takes the data roots
(``roots``; default: set up from ``CALIBNET_DATA`` as the commands do, see ``calibnet.paths``).

    from calibnet import api
    api.train(api.TrainRequest(501, "3d_fullres", "calsam", 0, epochs=10, loss=api.LossOptions(lambda_fip=0.1)))

Heavy modules (torch, nnU-Net) are imported when a function runs, so importing this module is cheap.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from calibnet.errors import CalibnetError
from calibnet.launch.experiment import FlagKind, TrainParser
from calibnet.launch.grid import GridOptions as ExperimentOptions
from calibnet.launch.options import (BackboneOptions, HeadOptions, LossOptions, NetworkOptions, PredictionOptions,
                                     TrainRequest, TrainResult)
from calibnet.methods import METHODS, get_method
from calibnet.paths import DataRoots, setup_data_roots
from calibnet.runs import DEFAULT_SEED, RunSpec

__all__ = ["train", "predict", "evaluate", "plan_and_preprocess", "convert_synthetic", "convert_corrupt",
           "convert_public", "method_list", "converter_list", "public_converters", "TrainRequest", "TrainResult",
           "LossOptions", "BackboneOptions", "NetworkOptions", "HeadOptions", "PredictionOptions", "PredictRequest",
           "PredictResult", "CommandResult", "check_train", "experiment", "ExperimentOptions", "ExperimentResult",
           "TrainParser", "FlagKind", "export", "ExportRequest"]


@dataclass
class CommandResult:
    """What a command produced and prints: ``lines`` on stdout, ``warnings`` on stderr."""
    folder: Path
    lines: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    result: object = None  # the stage's own result (PlanningResult, ConversionSummary, ...)


# ---- calib_train -------------------------------------------------------------------------------------------------

def train(request: TrainRequest, roots: DataRoots | None = None, log=print) -> TrainResult:
    """Train ``request.method`` on one fold (or a confidence head on a trained base run), then predict the
    fold's val and test cases, as ``calib_train`` does; progress lines go to ``log``. Returns the method
    trained, its folder and the prediction folders."""
    from calibnet.launch.train_and_predict import train_and_predict

    return train_and_predict(request, roots or setup_data_roots(), log)


def check_train(request: TrainRequest, roots: DataRoots | None = None, base_run: bool = True) -> str:
    """Refuse ``request`` as calib_train would (flags against the method, a confidence head's base method,
    prompt settings, preprocessed dataset and configuration, fold), without training; returns the method it
    would train. A confidence head also needs its finished base run, unless ``base_run`` is False (a grid that
    trains the base first)."""
    from calibnet.launch.request_checks import check_base_run, check_request

    roots = roots or setup_data_roots()
    method = check_request(request, roots.preprocessed)
    if base_run and get_method(method).trains_head:
        check_base_run(RunSpec.of(request), request.head.base, roots.preprocessed, roots.results)
    return method


def method_list() -> list:
    """``calib_train --list``: one line per method."""
    return [f"{method.alias:<14} {method.summary}" for method in METHODS.values()]


# ---- calib_predict -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PredictRequest:
    """``calib_predict``: the trained run (dataset, method, fold, configuration, split, seed) and the images.
    ``fold`` may also be several folds (``(0, 1, 2)``) or ``"all"`` (every fold with a finished run): their
    ensemble, as ``nnUNetv2_predict -f 0 1 2`` (see ``calibnet.inference.model_loading``)."""
    dataset_id: int
    method: str
    fold: int | Sequence[int] | str
    input_dir: Path  # CASE_0000.nii.gz, CASE_0001.nii.gz, ... (one file per channel)
    output_dir: Path
    configuration: str = "3d_fullres"
    split: str = "loco"
    seed: int = DEFAULT_SEED
    save_probabilities: bool = True
    use_mirroring: bool = True
    mc_samples: tuple = ()  # MC-dropout sample counts N (nnunet_dropout models)
    confidence: bool = False  # require the run's confidence heads and report their predicted Dice/NSD
    flag_below: float = 0.5  # with confidence: flag cases whose predicted Dice is below this
    device: str | None = None  # default: cuda when available
    prompt_setting: str | None = None  # SAM methods: a prompt-quality setting instead of the method's own prompts
    prompts_from: Path | None = None  # labels to derive prompts from (guided_nnunet and SAM methods)
    overwrite: bool = False  # replace the predictions already in output_dir
    checkpoint: str | None = None  # checkpoint file of each run; default: final, else best, else latest
    step_size: float = 0.5  # sliding-window step, a fraction of the patch size


@dataclass
class PredictResult:
    method: str
    folder: Path  # the run (the first fold's, for an ensemble)
    output_dir: Path
    confidences: dict  # case -> confidence.json entry
    flagged: dict  # case -> predicted Dice below flag_below (with confidence)
    lines: list  # what calib_predict prints
    folds: tuple = ()  # the folds predicted with (several: their ensemble)


def predict(request: PredictRequest, roots: DataRoots | None = None) -> PredictResult:
    """Segment every case in ``request.input_dir`` with a trained run, writing segmentations, probabilities
    and confidence.json to ``request.output_dir`` (whole, at the end; see ``calibnet.inference.new_images``)."""
    from calibnet.inference import flagged_cases, folder_case_inputs, load_fold_ensemble, new_images, predict_cases
    from calibnet.launch.training_run import default_device, locate_fold_runs

    roots = roots or setup_data_roots()
    if get_method(request.method).trains_head:
        raise CalibnetError(f"{request.method} is not a segmentation model: predict with the method it was trained "
                            f"on, e.g. calib_predict -m nnunet --confidence.")
    new_images.check_output_outside_input(request.input_dir, request.output_dir, request.prompts_from)
    requested = (request.fold,) if isinstance(request.fold, int) else request.fold
    spec = RunSpec(request.dataset_id, request.configuration, request.method, 0, request.split, request.seed)
    folders = locate_fold_runs(spec, requested, roots.preprocessed, roots.results)
    _check_ensemble_request(request, folders)
    model = load_fold_ensemble(folders, request.device or default_device(), use_mirroring=request.use_mirroring,
                               checkpoint_name=request.checkpoint, preprocessed_root=roots.preprocessed,
                               tile_step_size=request.step_size)
    folder = next(iter(folders.values()))
    _check_predict_request(request, model, folder)
    ending = model.dataset_json["file_ending"]
    new_images.check_no_earlier_predictions(request.output_dir, ending, request.overwrite)
    cases = folder_case_inputs(request.input_dir, model.dataset_json, request.prompts_from)
    spacings = new_images.check_case_channels(cases)
    warnings = new_images.input_warnings(request.input_dir, cases, spacings, model.dataset_json,
                                         model.plans_manager.plans)
    confidences = new_images.write_prediction_set(request.output_dir, ending, lambda partial: predict_cases(
        model, cases, partial, save_probabilities=request.save_probabilities, prompt_seed=request.seed,
        mc_samples=request.mc_samples, prompt_setting=request.prompt_setting))
    flagged = flagged_cases(confidences, request.flag_below) if request.confidence else {}
    note = model.record.get("note")
    source = f"({folder})" if len(folders) == 1 else \
        f"folds {', '.join(map(str, folders))} ensembled (mean of their logits; runs in {folder.parent})"
    lines = warnings + [f"predicted {len(cases)} case(s) with {request.method} {source} into {request.output_dir}"
                        + (f" — {note}" if note else "")]
    lines += [_case_line(case_id, scores, request.confidence) for case_id, scores in confidences.items()]
    lines += [f"warning: {case_id}: predicted Dice {dice:.3f} < {request.flag_below:g}; review this scan."
              for case_id, dice in flagged.items()]
    return PredictResult(request.method, folder, Path(request.output_dir), confidences, flagged, lines, tuple(folders))


def _check_ensemble_request(request: PredictRequest, folders: dict) -> None:
    """Refuse what needs one model when several folds are ensembled: confidence heads and MC-dropout samples
    describe one network, not the ensemble."""
    if len(folders) == 1:
        return
    listed = " ".join(map(str, folders))
    for flag, given in (("--confidence", request.confidence), ("--mc-samples", request.mc_samples)):
        if given:
            raise CalibnetError(f"{flag} scores one network, and -f {listed} ensembles {len(folders)}: predict one "
                                f"fold for {flag} (calib_predict -f {next(iter(folders))} {flag} ...).")


def _check_predict_request(request: PredictRequest, model, folder: Path) -> None:
    if request.confidence and not model.heads:
        fold = model.record["spec"]["fold"]
        raise CalibnetError(f"--confidence: {folder} has no trained confidence head; train one with calib_train "
                            f"{request.dataset_id} {request.configuration} confidence_head {fold} --split "
                            f"{request.split} --base {request.method}.")
    if request.prompt_setting is not None:
        from calibnet.prompt_quality import parse_setting
        parse_setting(request.prompt_setting)
        if not model.is_sam:
            raise CalibnetError(f"--prompts applies to SAM methods, not {request.method}.")


def _case_line(case_id: str, scores: dict, with_heads: bool) -> str:
    """One case as calib_predict prints it; with_heads adds the confidence heads' predicted Dice/NSD."""
    predicted = [f"{name.replace('_', ' ')} {value:.3f}" for name, value in scores.items()
                 if "_predicted_" in f"_{name}" and not isinstance(value, dict)]
    return (f"  {case_id}: mean max-probability over predicted foreground "
            f"{scores['mean_max_probability_foreground']:.3f}, foreground entropy "
            f"{scores['entropy_foreground']:.3f}" + ("; " + ", ".join(predicted) if with_heads else ""))


# ---- calib_export ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ExportRequest:
    """``calib_export``: the run (dataset, configuration, method, fold, split, seed) and where its nnU-Net model folder
    goes (default: ``fold_F/`` in the run's trainer folder, where ``nnUNetv2_predict -tr -p -c -f`` looks)."""
    dataset_id: int
    configuration: str
    method: str
    fold: int
    split: str = "loco"
    seed: int = DEFAULT_SEED
    output_dir: Path | None = None  # a model folder of its own (dataset.json, plans.json, fold_F/)
    overwrite: bool = False  # replace a fold_F holding another run (or model files of another dataset in output_dir)


def export(request: ExportRequest, roots: DataRoots | None = None) -> CommandResult:
    """Write the run's nnU-Net model folder, so that nnU-Net's own nnUNetv2_predict (or
    nnUNetv2_predict_from_modelfolder) predicts with it (see ``calibnet.launch.export``). ``result``: the
    ExportResult; ``lines``: where it went and nnU-Net's command."""
    from calibnet.launch.export import export_run

    roots = roots or setup_data_roots()
    exported = export_run(RunSpec.of(request), roots.preprocessed, roots.results, request.output_dir,
                          request.overwrite)
    return CommandResult(exported.model_folder, exported.lines, result=exported)


# ---- calib_evaluate ----------------------------------------------------------------------------------------------

def evaluate(split: str, dataset_id: int | None = None, methods: Sequence[str] | None = None,
             folds: Sequence[int] | None = None, seeds: Sequence[int] | None = None,
             configurations: Sequence[str] | None = None, seed: int = 0, roots: DataRoots | None = None,
             predictions: Sequence[Path] = (), names: Sequence[str] = (), progress: bool = True,
             num_processes: int = 1):
    """Evaluate every trained run of ``split`` (optionally only these methods, folds, seeds, configurations);
    writes ``$nnUNet_results/DatasetXXX/evaluation/SPLIT/``. Returns the ``Evaluation`` (folder, report,
    per-case table, missing runs); ``seed`` draws the voxel subsample of the post-hoc fits. ``predictions``:
    folders of nnU-Net-format predictions made elsewhere, scored beside the runs under ``names`` (one each);
    ``num_processes``: worker processes scoring cases (same results for any number)."""
    from calibnet.evaluation.evaluate import evaluate as evaluate_runs

    roots = roots or setup_data_roots()
    return evaluate_runs(roots.results, roots.raw, roots.preprocessed, split, dataset_id, methods, folds, seeds,
                         seed, progress, configurations=configurations, predictions=predictions, names=names,
                         num_processes=num_processes)


# ---- calib_experiment --------------------------------------------------------------------------------------------

@dataclass
class ExperimentResult:
    """What calib_experiment did: the grid read from the file, the state of every cell, the evaluation (once
    every cell is finished and the file asks for it)."""
    experiment: object  # launch.experiment.Experiment
    grid: object  # launch.grid.GridResult
    evaluation: object = None  # calib_evaluate's Evaluation
    lines: list = field(default_factory=list)


def experiment(path: Path, train_parser: TrainParser, options: ExperimentOptions = ExperimentOptions(),
               roots: DataRoots | None = None, log=print) -> ExperimentResult:
    """Run the grid of an experiment file (methods × folds × seeds, each cell an ordinary calib_train run;
    confidence heads after their base cells), skipping finished cells, then calib_evaluate it (the grid's
    networks: a head's scores are failure-detection rows of its base). Every cell is checked before the first
    runs, with calib_train's own flag parser ``train_parser`` (``calibnet.cli.experiment.train_parser()`` builds
    it from the calib_train command); progress lines go to ``log``."""
    from calibnet.launch.experiment import load_experiment
    from calibnet.launch.grid import run_grid

    roots = roots or setup_data_roots()
    loaded = load_experiment(Path(path), train_parser, roots)
    grid = run_grid(loaded, options, roots, log)
    result = ExperimentResult(loaded, grid, lines=list(grid.lines))
    if options.dry_run or not grid.complete or not loaded.evaluate:
        return result
    methods = list(loaded.evaluated)  # a confidence head's scores are rows of its base method
    log(f"calib_evaluate --split {loaded.split} -d {loaded.dataset_id} --methods {','.join(methods)} --folds "
        f"{','.join(map(str, loaded.folds))} --seeds {','.join(map(str, loaded.seeds))} --configuration "
        f"{loaded.configuration}")
    result.evaluation = evaluate(loaded.split, loaded.dataset_id, methods, loaded.folds, loaded.seeds,
                                 [loaded.configuration], roots=roots)
    return result


# ---- calib_plan_and_preprocess -----------------------------------------------------------------------------------

def plan_and_preprocess(dataset_id: int, configurations: Sequence[str] = ("2d", "3d_fullres"),
                        num_processes: int = 2, patch_size: Sequence[int] | None = None, gpu_memory_gb: float = 8,
                        split_seed: int | None = None, val_fraction: float | None = None, plan_only: bool = False,
                        roots: DataRoots | None = None, log=print) -> CommandResult:
    """Check, fingerprint, plan (CalibPlans), write the domain splits and (unless ``plan_only``) preprocess;
    progress goes to ``log``. The result's ``lines`` summarise plans and folds."""
    from calibnet.planners.plan_and_preprocess import plan_and_preprocess as plan
    from calibnet.planners.splits import DEFAULT_SPLIT_SEED, DEFAULT_VAL_FRACTION, describe_fold

    roots = roots or setup_data_roots()
    result = plan(dataset_id, roots.raw, roots.preprocessed, configurations=configurations,
                  num_processes=num_processes, patch_size=patch_size, gpu_memory_target_gb=gpu_memory_gb,
                  split_seed=DEFAULT_SPLIT_SEED if split_seed is None else split_seed,
                  val_fraction=DEFAULT_VAL_FRACTION if val_fraction is None else val_fraction,
                  preprocess=not plan_only, log=log)
    lines = [f"\n{result.dataset_name}"]
    lines += [f"  {name:<11} patch {'x'.join(str(p) for p in config['patch_size'])}, batch size "
              f"{config['batch_size']}, spacing {', '.join(f'{s:.3g}' for s in config['spacing'])} mm"
              for name, config in result.plans["configurations"].items() if "patch_size" in config]
    lines += [f"  plans: {result.plans_file}", f"  splits: {result.splits_file}"]
    lines += [f"    {family:<7} {describe_fold(family, fold)}: {len(fold['train'])} train, {len(fold['val'])} val, "
              f"{len(fold['test'])} test" for family in ("loco", "scanner") for fold in result.splits[family]["folds"]]
    if result.preprocessed_configurations:
        lines.append(f"  preprocessed: {', '.join(result.preprocessed_configurations)}")
    return CommandResult(result.plans_file.parent, lines, [f"warning: {w}" for w in result.warnings], result)


# ---- calib_convert -----------------------------------------------------------------------------------------------

def converter_list() -> list:
    """``calib_convert --list``: every converter with the layout it expects."""
    from calibnet.dataset_conversion.registry import GENERATED, PUBLIC_CONVERTERS

    return [f"{name:<12} {text}" for name, text in GENERATED.items()] + [
        f"{converter.name:<12} {converter.title}\n{'':<13}expects: {converter.layout}"
        for converter in PUBLIC_CONVERTERS.values()]


def public_converters() -> dict:
    """The public-dataset converters by name (title, default dataset name, expected layout, options)."""
    from calibnet.dataset_conversion.registry import PUBLIC_CONVERTERS

    return PUBLIC_CONVERTERS


def convert_synthetic(dataset_id: int = 501, name: str = "SynthBrain", seed: int = 42, n_centers: int = 4,
                      cases_per_center: int = 8, shape: Sequence[int] = (64, 64, 64),
                      channels: Sequence[str] = ("T1", "FLAIR"), label_mode: str = "lesion", preview: bool = True,
                      overwrite: bool = False, num_processes: int = 1,
                      roots: DataRoots | None = None) -> CommandResult:
    """Write the embedded multi-center benchmark (and its preview mosaic) under the raw root."""
    from calibnet.dataset_conversion.preview import save_domain_mosaic
    from calibnet.dataset_conversion.synthetic import SyntheticConfig, convert_synthetic as convert

    roots = roots or setup_data_roots()
    config = SyntheticConfig(dataset_id=dataset_id, name=name, seed=seed, n_centers=n_centers,
                             cases_per_center=cases_per_center, shape=tuple(shape), channels=tuple(channels),
                             label_mode=label_mode)
    folder = convert(config, roots.raw, overwrite=overwrite, num_processes=num_processes)
    lines = [f"wrote {config.n_centers * config.cases_per_center} cases to {folder}",
             f"  center/vendor metadata: {folder / 'domains.csv'}",
             f"  how each center was simulated: {folder / 'README.md'}"]
    if preview:
        lines.append(f"  preview mosaic: {save_domain_mosaic(folder)}")
    lines.append(f"next: calib_plan_and_preprocess -d {dataset_id}")
    return CommandResult(folder, lines, result=config)


def convert_corrupt(dataset_id: int, target_id: int, artifacts: Sequence[str], severities: Sequence[int],
                    seed: int = 0, include_clean: bool = True, name: str | None = None, overwrite: bool = False,
                    roots: DataRoots | None = None) -> CommandResult:
    """ATLAS-C style corrupted copies of dataset ``dataset_id`` as dataset ``target_id``."""
    import pandas as pd

    from calibnet.dataset_conversion.corrupt import convert_corrupt as convert
    from calibnet.planners.plan_and_preprocess import find_raw_dataset

    roots = roots or setup_data_roots()
    source = find_raw_dataset(roots.raw, dataset_id)
    folder = convert(source, roots.raw, target_id, list(artifacts), list(severities), seed=seed,
                     include_clean=include_clean, name=name, overwrite=overwrite)
    domains = pd.read_csv(folder / "domains.csv")
    counts = domains.groupby(["condition", "severity"]).size().rename("cases").reset_index()
    lines = [f"wrote {len(domains)} cases to {folder}", counts.to_markdown(index=False),
             f"next: calib_plan_and_preprocess -d {target_id}"]
    return CommandResult(folder, lines, result=domains)


def convert_public(converter: str, input_dir: Path, dataset_id: int, name: str | None = None,
                   overwrite: bool = False, roots: DataRoots | None = None, **options) -> CommandResult:
    """Convert a downloaded public dataset (``calib_convert --list`` names the converters and their layouts)."""
    from calibnet.dataset_conversion.registry import convert_public as convert

    roots = roots or setup_data_roots()
    summary = convert(converter, input_dir, roots.raw, dataset_id, name, overwrite, **options)
    lines = [f"wrote {summary.n_cases} cases to {summary.folder}", summary.counts.to_markdown(index=False)]
    lines += [f"note: {note}" for note in summary.notes]
    lines.append(f"next: calib_plan_and_preprocess -d {dataset_id}")
    return CommandResult(summary.folder, lines, result=summary)
