"""A run: one method trained on one fold of one split family with one seed. Its folder, record
(``calibnet_run.json``), checkpoints, prediction sets and the labels it predicts are defined here and only here;
training, inference and evaluation all read runs through this module.

Layout under nnU-Net's results tree::

    $nnUNet_results/DatasetXXX/<Trainer>__CalibPlans__<configuration>/<split>_fold<F>_seed<S>/
        calibnet_run.json, checkpoint_{final,best,latest}.pth, nnU-Net's log and progress plot
        predictions/{val,test}/                    CASE.nii.gz, CASE.npz (float32 probabilities), confidence.json,
                                                   and for nnU-Net's tools CASE.pkl, dataset.json, plans.json
        predictions/prompts_<SET>/{val,test}/      the same with a prompt-quality setting, plus prompts.json
    $nnUNet_results/DatasetXXX/<Trainer>__CalibPlans__<configuration>/fold_<F>/
        checkpoint_final.pth, calibnet_export.json  calib_export: one run as nnU-Net's model of fold F
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from calibnet.errors import CalibnetError
from calibnet.files import atomic_write_json

CALIB_PLANS_NAME = "CalibPlans"
RUN_FILENAME = "calibnet_run.json"
CONFIDENCE_FILENAME = "confidence.json"
PROMPTS_FILENAME = "prompts.json"
NO_UGPA = "noUGPA"  # prediction-set suffix of medsam_u predicted without prompt adaptation
DEFAULT_SEED = 42
ROLES = ("val", "test")  # val = source-domain cases of the fold, test = the shifted domain
MODEL_CHECKPOINTS = ("checkpoint_final.pth", "checkpoint_best.pth", "checkpoint_latest.pth")
RESUME_CHECKPOINTS = ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth")


@dataclass
class RunSpec:
    """Which model: dataset, configuration, method, split family, fold and seed."""
    dataset_id: int
    configuration: str
    method: str
    fold: int
    split: str = "loco"
    seed: int = DEFAULT_SEED

    @classmethod
    def of(cls, request) -> "RunSpec":
        """The spec of a request naming a run (calib_train's or calib_predict's: the same six fields)."""
        return cls(request.dataset_id, request.configuration, request.method, request.fold, request.split,
                   request.seed)

    @property
    def training_command(self) -> str:
        """The calib_train command that trains this run."""
        return f"calib_train {self.dataset_id} {self.configuration} {self.method} {self.fold} --split {self.split}" \
               + (f" --seed {self.seed}" if self.seed != DEFAULT_SEED else "")


@dataclass
class RunRecord:
    """What calibnet_run.json holds. calib_train adds ``"seconds"`` once training has finished (written by
    ``calibnet/launch/train_and_predict.py``, read by the evaluation's compute table; older runs lack it)::

        "seconds": {"training": 812.4,                   # the training call (summed over --continue attempts)
                    "prediction": 35.1,                  # val + test with the run's own prompts (last prediction)
                    "prediction_prompts": {"3B0.5": 20.2},            # per prompt-quality prediction set
                    "confidence_heads": {"confidence_head": {"training": 95.0, "scoring": 12.3}}}

    Only runs trained since seconds were kept have ``training``; every other key may be absent too.
    """
    spec: dict
    dataset_name: str
    trainer: str
    fold_description: str
    epochs: int
    iterations_per_epoch: int
    device: str
    loss_options: dict = field(default_factory=dict)
    backbone: dict | None = None  # SAM methods: {"model", "checkpoint"} (SAM 2 also "image_size", "version")
    target_label: int | None = None  # SAM methods: the binary target (None = all foreground)
    network_options: dict = field(default_factory=dict)  # architecture/prediction options (medsam_u)
    note: str = ""  # e.g. "tiny SAM, not pretrained", repeated wherever results are reported
    # SAM-FT methods: "box" or "points" per slice (calib_train --sam-prompt) where it differs from the method's own;
    # None or absent: the method's own (calibnet.methods.Method.sam_prompt_of)
    sam_prompt: str | None = None
    num_gpus: int = 1  # GPUs it trained on (> 1: nnU-Net's DDP); absent in records written before: 1


def run_folder(results_root: Path, dataset_name: str, trainer_name: str, spec: RunSpec) -> Path:
    return (Path(results_root) / dataset_name / f"{trainer_name}__{CALIB_PLANS_NAME}__{spec.configuration}"
            / f"{spec.split}_fold{spec.fold}_seed{spec.seed}")


def finished_folds(results_root: Path, dataset_name: str, trainer_name: str, spec: RunSpec) -> list:
    """The folds of ``spec``'s method, configuration, split and seed whose run has finished (``run_state``)."""
    parent = run_folder(results_root, dataset_name, trainer_name, spec).parent
    pattern = re.compile(rf"{re.escape(spec.split)}_fold(\d+)_seed{spec.seed}")
    return sorted(int(match.group(1)) for folder in parent.glob(f"{spec.split}_fold*_seed{spec.seed}")
                  if (match := pattern.fullmatch(folder.name)) and run_state(folder) == "finished")


def read_run(folder: Path) -> dict:
    """The record of a finished run, or a message saying the folder holds none."""
    path = Path(folder) / RUN_FILENAME
    if not path.is_file():
        raise CalibnetError(f"{path} is missing: {folder} holds no finished calibnet training; run calib_train first.")
    return json.loads(path.read_text())


def write_run(folder: Path, record: dict) -> None:
    atomic_write_json(Path(folder) / RUN_FILENAME, record)


RUN_LOCK_FILENAME = ".calibnet_run.lock"


def update_run(folder: Path, change) -> dict:
    """Read a run's record, let ``change(record)`` edit it in place and write it back atomically, holding an
    exclusive lock on ``.calibnet_run.lock`` in the run folder meanwhile, so that two processes adding to one
    record (two confidence heads trained on one base) keep each other's entries. Returns the record."""
    import fcntl

    with open(Path(folder) / RUN_LOCK_FILENAME, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError:  # a file system without locks: update unlocked
            pass
        record = read_run(folder)
        change(record)
        write_run(folder, record)
    return record


def model_checkpoint(folder: Path, name: str | None = None) -> Path | None:
    """The checkpoint that *is* the run's model (for predicting, or as a head's frozen base): ``name`` when
    given, else checkpoint_final, else _best, else _latest; None when there is none."""
    names = (name,) if name else MODEL_CHECKPOINTS
    return next((Path(folder) / n for n in names if (Path(folder) / n).is_file()), None)


def resume_checkpoint(folder: Path) -> Path | None:
    """What ``--continue`` resumes from: checkpoint_final, else _latest, else _best (as nnU-Net does)."""
    return next((Path(folder) / n for n in RESUME_CHECKPOINTS if (Path(folder) / n).is_file()), None)


def run_state(folder: Path) -> str:
    """``finished`` (checkpoint_final.pth and calibnet_run.json), ``interrupted`` (a checkpoint, but not both) or
    ``new`` (no checkpoint: nothing trained there yet)."""
    folder = Path(folder)
    if (folder / MODEL_CHECKPOINTS[0]).is_file() and (folder / RUN_FILENAME).is_file():
        return "finished"
    return "interrupted" if model_checkpoint(folder) is not None else "new"


def busy_lock_path(folder: Path) -> Path:
    """The lock a process holds while it trains or predicts in a run (``calibnet.launch.run_lock``):
    ``.<run folder name>.lock`` beside the run folder, so that it stays put while ``--overwrite`` swaps the folder."""
    folder = Path(folder)
    return folder.parent / f".{folder.name}.lock"


def prediction_folder(run_folder: Path, role: str, prompt_setting: str | None = None) -> Path:
    """``predictions/<role>`` of a run, or ``predictions/prompts_<SET>/<role>`` for a prediction set made
    with a prompt-quality setting (SET = the setting, plus ``_noUGPA`` for medsam_u without UGPA)."""
    base = Path(run_folder) / "predictions"
    return base / role if prompt_setting is None else base / f"prompts_{prompt_setting}" / role


def prompt_settings_of(run_folder: Path) -> list:
    """The prediction sets of a run besides its own prompts (``3B0.5``, ``3B0.5_noUGPA``, …)."""
    base = Path(run_folder) / "predictions"
    return sorted(p.name[len("prompts_"):] for p in base.glob("prompts_*") if p.is_dir())


def case_prediction_files(folder: Path, case_id: str, file_ending: str) -> tuple[Path, Path]:
    """(segmentation, probabilities .npz) of one case in a prediction folder."""
    return Path(folder) / f"{case_id}{file_ending}", Path(folder) / f"{case_id}.npz"


# What nnU-Net's predictor writes beside its predictions, which calibnet writes too so that nnU-Net's tools
# (nnUNetv2_ensemble, nnUNetv2_apply_postprocessing) take a calibnet prediction folder: the folder's dataset.json and
# plans.json, and per case CASE.pkl, nnU-Net's image properties (the geometry a segmentation is written with).
# calibnet never reads them: a .pkl is a pickle, and loading one can run code.
NNUNET_FOLDER_FILES = ("dataset.json", "plans.json")
NNUNET_CASE_PROPERTIES_ENDING = ".pkl"


def is_nnunet_prediction_file(name: str) -> bool:
    """Whether a file of a prediction folder is one written only for nnU-Net's tools (NNUNET_FOLDER_FILES, CASE.pkl)."""
    return name in NNUNET_FOLDER_FILES or name.endswith(NNUNET_CASE_PROPERTIES_ENDING)


def prediction_set_complete(run_folder: Path, prompt_setting: str | None = None) -> bool:
    """Whether the val and test predictions of a set are there (their confidence.json, and prompts.json for a
    prompt-quality set). Each role folder is predicted into a temporary sibling and renamed into place when every
    case is written (``calibnet.inference.predict_run_splits``), so a killed prediction leaves no role folder."""
    names = (CONFIDENCE_FILENAME,) if prompt_setting is None else (CONFIDENCE_FILENAME, PROMPTS_FILENAME)
    return all((prediction_folder(run_folder, role, prompt_setting) / n).is_file() for role in ROLES for n in names)


@dataclass(frozen=True)
class LabelTargets:
    """What is evaluated: named binary masks of the label map, and how probabilities map to classes."""
    masks: dict  # output name -> list of label values forming it
    regions: bool  # probabilities are per-region sigmoids (nnU-Net regions) rather than a softmax
    binary: bool = False  # SAM runs: the prediction is one binary target


def label_targets(dataset_json: dict, record: dict) -> LabelTargets:
    """What a run's predictions are scored on: every label/region, or a SAM run's one binary target."""
    labels = {k: v for k, v in dataset_json["labels"].items() if k != "background"}
    if record.get("backbone") is not None:
        target = record.get("target_label")
        values = sorted({x for v in labels.values() for x in (v if isinstance(v, list) else [v])})
        return LabelTargets({binary_target_name(dataset_json, record): values if target is None else [target]}, False,
                            binary=True)
    regions = any(isinstance(v, list) for v in labels.values())
    return LabelTargets({k: (v if isinstance(v, list) else [v]) for k, v in labels.items()}, regions)


def binary_target_name(dataset_json: dict, record: dict) -> str:
    """The name of a SAM run's one binary target: ``foreground`` (all labels) or the chosen label's name."""
    target = record.get("target_label")
    return "foreground" if target is None else next(
        (k for k, v in dataset_json["labels"].items() if v == target), f"label_{target}")


def target_mask(seg, target_label: int | None):
    """A SAM run's binary target of a label map: the chosen label, or all foreground (``target_label`` None)."""
    return seg > 0 if target_label is None else seg == target_label


def export_dataset_json(dataset_json: dict, record: dict) -> dict:
    """The labels a run predicts: SAM methods predict one binary target, exported as background/target."""
    if record.get("backbone") is None:
        return dataset_json
    binary = dict(dataset_json, labels={"background": 0, binary_target_name(dataset_json, record): 1})
    binary.pop("regions_class_order", None)
    return binary


@dataclass(frozen=True)
class Run:
    folder: Path
    record: dict  # calibnet_run.json

    @property
    def method(self) -> str:
        return self.record["spec"]["method"]

    @property
    def fold(self) -> int:
        return int(self.record["spec"]["fold"])

    @property
    def seed(self) -> int:
        return int(self.record["spec"]["seed"])

    @property
    def note(self) -> str:
        return self.record.get("note", "")

    @property
    def configuration(self) -> str:
        return self.record["spec"]["configuration"]

    @property
    def seconds(self) -> dict:
        """The wall-clock seconds calib_train recorded (see RunRecord); {} for runs recorded before that."""
        return self.record.get("seconds") or {}

    @property
    def num_gpus(self) -> int:
        """The GPUs its training ran on (the seconds are wall-clock seconds of all of them); 1 for runs recorded
        before this was kept."""
        return int(self.record.get("num_gpus", 1))

    @property
    def sam_prompt(self) -> str | None:
        """The per-slice prompts of a SAM run ("points" or "box": its --sam-prompt, else its method's own); None
        for other runs."""
        if self.record.get("backbone") is None:
            return None
        from calibnet.methods import method_of_trainer

        return method_of_trainer(self.record["trainer"]).sam_prompt_of(self.record)

    def completing_command(self, prompt_setting: str | None = None) -> str:
        """The calib_train command that (re)predicts this run's val and test cases (of a prompt-quality set)."""
        spec = self.record["spec"]
        command = f"calib_train {spec['dataset_id']} {self.configuration} {self.method} {self.fold} --split " \
                  f"{spec.get('split', 'loco')}" + (f" --seed {self.seed}" if self.seed != DEFAULT_SEED else "")
        if prompt_setting is not None:
            setting, no_ugpa = (prompt_setting[:-len(NO_UGPA) - 1], True) if prompt_setting.endswith(f"_{NO_UGPA}") \
                else (prompt_setting, False)
            command += f" --prompts {setting}" + (" --no-ugpa" if no_ugpa else "")
        return command + " --predict-only"

    @property
    def identity(self) -> dict:
        """What changes the model besides fold and seed: configuration, backbone, target, SAM prompts, loss and
        network options."""
        backbone = self.record.get("backbone") or {}
        return {"configuration": self.configuration,
                **{f"backbone {k}": v for k, v in backbone.items() if v is not None},
                **({"target": self.record["target_label"]} if self.record.get("target_label") is not None else {}),
                **({"sam prompt": self.sam_prompt} if self.sam_prompt is not None else {}),
                **self.record.get("loss_options", {}),
                **{k: v for k, v in self.record.get("network_options", {}).items() if k != "seed"}}


def run_labels(runs: list) -> dict:
    """Row label of each run (by folder): the method name, qualified by what differs between runs of the same
    method ("nnunet (2d)", "nnunet (3d_fullres)"), so that different models are never pooled into one row."""
    labels = {}
    for method in {r.method for r in runs}:
        of_method = [r for r in runs if r.method == method]
        keys = sorted({k for r in of_method for k in r.identity})
        varying = [k for k in keys if len({repr(r.identity.get(k)) for r in of_method}) > 1]
        for run in of_method:
            parts = [str(run.identity.get(k)) if k in ("configuration", "backbone model") else f"{k}={run.identity.get(k)}"
                     for k in varying]
            labels[run.folder] = f"{method} ({', '.join(parts)})" if parts else method
    return labels


def discover_runs(results_root: Path, split: str, dataset_id: int | None = None, methods=None, folds=None,
                  seeds=None, configurations=None) -> tuple[str, list, list]:
    """(dataset name, runs with predictions, messages about runs whose predictions are missing)."""
    results_root = Path(results_root)
    datasets = sorted(p.name for p in results_root.glob("Dataset[0-9][0-9][0-9]_*")
                      if any(p.glob(f"*/{split}_fold*_seed*/calibnet_run.json")))
    if dataset_id is not None:
        datasets = [d for d in datasets if d.startswith(f"Dataset{int(dataset_id):03d}_")]
    if not datasets:
        where = f"dataset {dataset_id}" if dataset_id is not None else "any dataset"
        raise CalibnetError(f"no trained {split} runs for {where} in {results_root}; train with "
                            f"calib_train ... --split {split} first.")
    if len(datasets) > 1:
        raise CalibnetError(f"several datasets have {split} results ({', '.join(datasets)}); choose one with -d.")
    dataset = datasets[0]
    every = [Run(p.parent, json.loads(p.read_text()))
             for p in sorted((results_root / dataset).glob(f"*/{split}_fold*_seed*/calibnet_run.json"))]
    _check_selection(every, dataset, split, methods, folds, seeds)
    runs, missing = [], []
    for run in every:
        if methods and run.method not in methods or folds and run.fold not in folds or seeds and run.seed not in seeds \
                or configurations and run.configuration not in configurations:
            continue
        absent = [r for r in ROLES if not (prediction_folder(run.folder, r) / CONFIDENCE_FILENAME).is_file()]
        if absent:
            missing.append(f"{run.method} {run.configuration} {split} fold {run.fold} seed {run.seed}: no "
                           f"{' and '.join(absent)} predictions (not evaluated; complete them with: "
                           f"{run.completing_command()})")
            continue
        runs.append(run)
    if methods:
        found = {r.method for r in runs}
        missing += [f"{m}: no {split} run with predictions" for m in methods if m not in found]
    if not runs:
        raise CalibnetError(f"no {split} run of {dataset} has predictions to evaluate: " + "; ".join(missing))
    return dataset, runs, missing


def _check_selection(runs: list, dataset: str, split: str, methods, folds, seeds) -> None:
    """Refuse a method name that is not a method, and folds or seeds that no run of the split has (naming those
    that exist)."""
    from calibnet.methods import METHODS

    unknown = [m for m in methods or () if m not in METHODS]
    if unknown:
        raise CalibnetError(f"--methods: {', '.join(unknown)} is not a method; known methods: {', '.join(METHODS)} "
                            f"(calib_train --list).")
    for flag, asked, have in (("--folds", folds, {r.fold for r in runs}), ("--seeds", seeds, {r.seed for r in runs})):
        absent = sorted(set(asked or ()) - have)
        if absent:
            raise CalibnetError(f"{flag}: no {split} run of {dataset} has {flag[2:-1]} {', '.join(map(str, absent))}; "
                                f"trained {flag[2:]}: {', '.join(map(str, sorted(have)))}.")
