"""An experiment file (``calib_experiment EXPERIMENT.yaml``) read into a grid of cells, every one checked
before anything runs.

    name: scanner_table            # optional, default: the file's stem
    dataset: 501
    configuration: 3d_fullres
    split: scanner                 # loco | scanner
    folds: all                     # or a list: [0, 1]
    seeds: [42, 2024, 3407]        # default [42]
    train: {epochs: 8, iters-per-epoch: 25, device: cpu}    # calib_train flags of every cell
    methods:
      - nnunet
      - calsam: {lambda-fip: 0.1}  # flags of this method's cells (they win over train's)
      - confidence_head: {base: nnunet, warmup-batches: 10}   # a head on each nnunet cell of the grid
    prompts: [3P, 3B0.5]           # SAM methods: also predicted with these prompt-quality settings
    evaluate: true                 # calib_evaluate the grid once every cell is finished

A cell is one method on one fold with one seed: an ordinary ``calib_train`` run whose argv is built here and
checked with calib_train's own flag parser (``TrainParser``, given by the command line layer) and
``request_checks.check_request``. Every error names ``FILE:LINE``.

A ``confidence_head`` entry names its ``base`` method; its cells (``calib_train ... confidence_head F --base
BASE``) train a head on the base's run of the same fold and seed, into the head's folder inside that run, and
add its scores to the run's val and test ``confidence.json``. When the base is a method of the grid, each head
cell waits for its base cell (``Cell.base``; ``grid.py`` runs heads in a second wave); otherwise every base
run must be trained already, which is checked here.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

from calibnet.errors import CalibnetError
from calibnet.launch.request_checks import (check_base_run, check_dataset, check_head_base, check_request,
                                            preprocessed_dataset, split_folds)
from calibnet.methods import METHODS, get_method, method_variant
from calibnet.paths import DataRoots
from calibnet.runs import DEFAULT_SEED, RunSpec, run_folder

KEYS = ("name", "dataset", "configuration", "split", "folds", "seeds", "train", "methods", "prompts", "evaluate")
REQUIRED = ("dataset", "configuration", "split", "folds", "methods")
SPLITS = ("loco", "scanner")
# calib_train flags an experiment sets itself, with what to write instead
OWN_FLAGS = {"split": "set it once with the top-level `split:`", "seed": "list the seeds under `seeds:`",
             "prompts": "list prompt settings under the top-level `prompts:` (given to SAM methods)",
             "continue": "calib_experiment continues interrupted cells itself",
             "overwrite": "calib_experiment never trains a finished cell again (delete its run folder to retrain it)",
             "predict-only": "calib_experiment trains and predicts every cell",
             "list": "not a training flag", "help": "not a training flag"}
# flags that make calib_train train another method (its own run folders): that method is listed by its alias
VARIANT_FLAGS = {"backbone": None, "no-e1": "e1", "no-e2": "e2", "no-crl": "crl"}


@dataclass(frozen=True)
class FlagKind:
    """How a calib_train flag takes its value: ``is_flag`` (on/off, YAML true/false), ``multiple`` (repeatable,
    a YAML list)."""
    is_flag: bool = False
    multiple: bool = False


@dataclass(frozen=True)
class TrainParser:
    """calib_train's own flags (long name without ``--`` -> FlagKind) and parser (argv -> TrainRequest, a
    CalibnetError for what it refuses); the command line layer builds it from the calib_train command."""
    flags: dict
    parse: Callable


@dataclass(frozen=True)
class HeadTarget:
    """What a confidence-head cell writes besides its folder: the head's checkpoint, and the key of the head's
    scores in the val and test ``confidence.json`` of the base run (``base_folder``)."""
    base_folder: Path
    checkpoint: Path
    scores: str  # e.g. adversarial_head_predicted_dice


@dataclass(frozen=True)
class Cell:
    """One calib_train run of the grid."""
    name: str  # METHOD_SPLIT_foldF_seedS (heads: HEADFOLDER-BASE_SPLIT_foldF_seedS): its log and status entries
    method: str
    fold: int
    seed: int
    argv: tuple  # calib_train's arguments
    folder: Path  # its run folder (a head: the head's folder inside the base run)
    prompts: tuple  # prompt settings whose prediction sets it writes besides its own
    resumable: bool  # trains a network: an interrupted attempt continues from its checkpoint
    head: HeadTarget | None = None  # a confidence head: what it writes
    base: str | None = None  # a confidence head whose base is a method of the grid: the base's cell


@dataclass(frozen=True)
class _Entry:
    """One item of the ``methods`` list: its index, alias, own flags and, for a confidence head, the base method
    and whether the head is adversarial; ``label`` names it (``confidence_head-BASE`` for a head)."""
    index: int
    alias: str
    own: dict
    base: str | None = None
    adversarial: bool = True

    @property
    def label(self) -> str:
        if self.base is None:
            return self.alias
        return f"{self.alias if self.adversarial else self.alias + '_plain'}-{self.base}"


@dataclass(frozen=True)
class Experiment:
    path: Path
    name: str
    dataset_id: int
    dataset_name: str
    configuration: str
    split: str
    folds: tuple
    seeds: tuple
    methods: tuple  # every entry of the methods list (a head as confidence_head-BASE)
    cells: tuple
    evaluate: bool
    folder: Path  # $nnUNet_results/DatasetXXX/experiments/<name>: logs, status.json, submitit's files
    evaluated: tuple = ()  # the methods calib_evaluate is given: the networks (a head's scores are its base's)


class _Lines:
    """Line numbers of the parts of a composed YAML document, for messages naming ``FILE:LINE``."""

    def __init__(self, path: Path, root: yaml.Node):
        self.path, self.root = path, root

    def line(self, *keys) -> int:
        """The line of the innermost of ``keys`` (mapping keys, sequence indices) that the document has."""
        node, line = self.root, self.root.start_mark.line + 1
        for key in keys:
            if isinstance(node, yaml.MappingNode):
                pair = next(((k, v) for k, v in node.value if k.value == str(key)), None)
                if pair is None:
                    break
                line, node = pair[0].start_mark.line + 1, pair[1]
            elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
                node = node.value[key]
                line = node.start_mark.line + 1
            else:
                break
        return line

    def at(self, *keys) -> str:
        return f"{self.path}:{self.line(*keys)}"

    def error(self, *keys, message: str) -> str:
        return f"{self.at(*keys)}: {message}"


def _compose(path: Path) -> tuple[dict, _Lines]:
    """The document's values (YAML's safe types) and its line numbers; duplicate keys are refused."""
    try:
        root = yaml.compose(path.read_text(), Loader=yaml.SafeLoader)
    except OSError as e:
        raise CalibnetError(f"{path}: cannot read the experiment file: {e.strerror}.") from None
    except yaml.YAMLError as e:
        mark, context = getattr(e, "problem_mark", None), getattr(e, "context_mark", None)
        where = f" ({e.context} on line {context.line + 1})" if context is not None and e.context else ""
        raise CalibnetError(f"{path}:{mark.line + 1 if mark else 1}: not valid YAML: "
                            f"{getattr(e, 'problem', None) or e}{where}.") from None
    if not isinstance(root, yaml.MappingNode):
        raise CalibnetError(f"{path}:1: an experiment file is a mapping of {', '.join(KEYS)}.")
    errors = [f"{path}:{k.start_mark.line + 1}: {k.value!r} is given twice."
              for node in _mappings(root) for i, (k, _) in enumerate(node.value)
              if any(k.value == other.value for other, _ in node.value[:i])]
    if errors:
        raise CalibnetError("\n".join(errors))
    return yaml.SafeLoader("").construct_document(root), _Lines(path, root)


def _mappings(node: yaml.Node):
    if isinstance(node, yaml.MappingNode):
        yield node
        for key, value in node.value:
            yield from _mappings(value)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            yield from _mappings(item)


def _int_list(value, what: str, allow_all: bool = False) -> list:
    """A YAML int or list of ints (``all`` where allowed) as a list; a message saying what is wrong otherwise."""
    if allow_all and value == "all":
        return ["all"]
    values = value if isinstance(value, list) else [value]
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in values):
        raise ValueError(f"{what} is a list of non-negative integers{' or all' if allow_all else ''}, "
                         f"not {value!r}.")
    if len(set(values)) != len(values):
        raise ValueError(f"{what} lists a value twice: {value!r}.")
    return values


def _check_top_level(doc: dict, lines: _Lines) -> list:
    """Messages about unknown, missing or mistyped top-level keys."""
    errors = [lines.error(key, message=f"unknown key {key!r}" + _did_you_mean(str(key), KEYS) + "; an experiment "
                                       f"has {', '.join(KEYS)}.") for key in doc if key not in KEYS]
    errors += [lines.error(message=f"{key!r} is missing (an experiment needs {', '.join(REQUIRED)}).")
               for key in REQUIRED if key not in doc]
    checks = {"name": lambda v: isinstance(v, str) and re.fullmatch(r"[A-Za-z0-9_.-]+", v),
              "dataset": lambda v: isinstance(v, int) and not isinstance(v, bool),
              "configuration": lambda v: isinstance(v, str), "split": lambda v: v in SPLITS,
              "train": lambda v: v is None or isinstance(v, dict),
              "methods": lambda v: isinstance(v, list) and v, "evaluate": lambda v: isinstance(v, bool)}
    wanted = {"name": "letters, digits, '_', '-' and '.'", "dataset": "a dataset id (e.g. 501)",
              "configuration": "an nnU-Net configuration (2d, 3d_fullres, ...)", "split": " or ".join(SPLITS),
              "train": "a mapping of calib_train flags", "methods": "a list of methods",
              "evaluate": "true or false"}
    errors += [lines.error(key, message=f"{key} must be {wanted[key]}, not {doc[key]!r}.")
               for key, check in checks.items() if key in doc and not check(doc[key])]
    for key, allow_all in (("folds", True), ("seeds", False)):
        try:
            _int_list(doc.get(key, [DEFAULT_SEED]), key, allow_all)
        except ValueError as e:
            errors.append(lines.error(key, message=str(e)))
    return errors


def _did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _method_entries(doc: dict, lines: _Lines) -> tuple[list, list]:
    """The ``methods`` list as _Entry items, and messages about its entries."""
    entries, errors, seen = [], [], {}
    for index, item in enumerate(doc["methods"]):
        if isinstance(item, dict) and len(item) == 1:
            alias, flags = next(iter(item.items()))
        else:
            alias, flags = item, None
        if not isinstance(alias, str) or not isinstance(flags, (dict, type(None))):
            errors.append(lines.error("methods", index, message=f"a method is an alias or {{alias: {{flag: value}}}}, "
                                                                 f"not {item!r}."))
            continue
        entry = _Entry(index, alias, flags or {})
        if alias not in METHODS:
            errors.append(lines.error("methods", index, message=f"unknown method {alias!r}"
                                      + _did_you_mean(alias, METHODS) + "; calib_train --list shows every method."))
            continue
        if METHODS[alias].trains_head:
            entry, error = _head_entry(entry, doc, lines)
            if error:
                errors.append(error)
                continue
        if entry.label in seen:
            errors.append(lines.error("methods", index, message=_twice(entry, seen[entry.label])))
        seen.setdefault(entry.label, lines.line("methods", index))
        entries.append(entry)
    return entries, errors


def _head_entry(entry: _Entry, doc: dict, lines: _Lines) -> tuple[_Entry, str | None]:
    """A confidence-head entry with its base method and kind, or the message saying what is wrong with its
    ``base``: missing, not a method, itself a head."""
    alias, own = entry.alias, entry.own
    example = f"- {alias}: {{base: nnunet}}"
    if "base" not in own:
        return entry, lines.error("methods", entry.index, message=f"{alias} needs base: the method whose runs (same "
                                  f"fold and seed) the head reads, e.g. `{example}`.")
    base, where = own["base"], ("methods", entry.index, alias, "base")
    if not isinstance(base, str) or base not in METHODS:
        return entry, lines.error(*where, message=f"base: unknown method {base!r}" + _did_you_mean(str(base), METHODS)
                                  + "; calib_train --list shows every method.")
    if METHODS[base].trains_head:
        return entry, lines.error(*where, message=f"base: {base} is itself a confidence head; a head reads the "
                                  "network of a segmentation method, e.g. nnunet or nnunet_dropout.")
    try:
        check_head_base(base)
    except CalibnetError as e:
        return entry, lines.error(*where, message=str(e))
    plain = own.get("no-adversarial", (doc.get("train") or {}).get("no-adversarial")) is True
    return _Entry(entry.index, alias, {k: v for k, v in own.items() if k != "base"}, base, not plain), None


def _twice(entry: _Entry, line: int) -> str:
    if entry.base is None:
        return (f"method {entry.alias} is listed twice (line {line}); a run folder is per method, fold and seed, so "
                "each method appears once.")
    return (f"{entry.label.split('-')[0]} on {entry.base} is listed twice (line {line}); both would train the "
            f"{entry.label.split('-')[0]}/ folder of the {entry.base} runs (one base takes an adversarial head and a "
            "plain one, no-adversarial: true).")


def _flag_argv(name: str, value, kind: FlagKind) -> list:
    """calib_train's argv for one YAML flag (none for false/null); a ValueError saying how to write it."""
    if value is None or (kind.is_flag and value is False):
        return []
    if kind.is_flag:
        if value is not True:
            raise ValueError(f"--{name} is on or off: write {name}: true, not {value!r}.")
        return [f"--{name}"]
    values = value if isinstance(value, list) else [value]
    if any(isinstance(v, (bool, dict, list)) or v is None for v in values) or not values:
        raise ValueError(f"--{name} takes a value (a number or a word), not {value!r}.")
    if len(values) > 1 and not kind.multiple:
        raise ValueError(f"--{name} takes one value, not {value!r}.")
    return [token for v in values for token in (f"--{name}", str(v))]


def _variant_message(name: str, value, alias: str | None) -> str:
    """Why a flag that selects another method is refused, and which alias to list instead."""
    if alias is None:
        return (f"--{name} makes calib_train train another method, with run folders of its own: list that method by "
                f"its alias under methods (safeclick --backbone litemedsam is safeclick_lite, safeclick --no-e1 is "
                f"safeclick_no_e1).")
    backbone = value if name == "backbone" else None
    removed = (VARIANT_FLAGS[name],) if name != "backbone" and value is True else ()
    try:
        variant = method_variant(alias, backbone, removed)
    except CalibnetError as e:
        return str(e)
    if variant == alias:
        return f"--{name} {value}: {alias} needs no such flag; remove it."
    return (f"{alias} with --{name} trains {variant}, a method with run folders of its own: list {variant} under "
            f"methods instead.")


def _flag_segments(flags: dict, lines: _Lines, keys: tuple, parser: TrainParser,
                   alias: str | None) -> tuple[dict, list]:
    """{flag: (argv, where)} of a mapping of calib_train flags (``keys`` locate it in the file), and messages
    about the flags refused."""
    segments, errors = {}, []
    for name, value in flags.items():
        where = lines.at(*keys, name)
        if not isinstance(name, str):
            errors.append(f"{where}: {name!r} is not a calib_train flag.")
        elif name in OWN_FLAGS:
            errors.append(f"{where}: --{name} is not given per cell: {OWN_FLAGS[name]}.")
        elif name in VARIANT_FLAGS:
            errors.append(f"{where}: {_variant_message(name, value, alias)}")
        elif name not in parser.flags:
            errors.append(f"{where}: unknown calib_train flag --{name}" + _did_you_mean(name, parser.flags)
                          + " (flags are written without their dashes; calib_train --help lists them).")
        else:
            try:
                segments[name] = (_flag_argv(name, value, parser.flags[name]), where)
            except ValueError as e:
                errors.append(f"{where}: {e}")
    return segments, errors


def _prompt_settings(doc: dict, lines: _Lines) -> tuple[list, list]:
    from calibnet.prompt_quality import parse_setting

    value = doc.get("prompts") or []
    settings = value if isinstance(value, list) else [value]
    errors = []
    for index, setting in enumerate(settings):
        try:
            parse_setting(str(setting))
        except CalibnetError as e:
            errors.append(lines.error("prompts", index, message=str(e)))
    return [str(s) for s in settings], errors


def _raise(errors: list) -> None:
    if errors:
        raise CalibnetError("\n".join(errors))


def _check_data(doc: dict, lines: _Lines, roots: DataRoots) -> tuple[Path, list]:
    """The preprocessed dataset folder and the folds (``all`` expanded): the dataset must be preprocessed for
    the configuration and every fold must exist in the split."""
    try:
        preprocessed_dataset(roots.preprocessed, doc["dataset"])
    except CalibnetError as e:
        raise CalibnetError(lines.error("dataset", message=str(e))) from None
    try:
        folder = check_dataset(doc["dataset"], doc["configuration"], roots.preprocessed)
    except CalibnetError as e:
        raise CalibnetError(lines.error("configuration", message=str(e))) from None
    try:
        count = split_folds(folder, doc["split"])
    except CalibnetError as e:
        raise CalibnetError(lines.error("split", message=str(e))) from None
    folds = _int_list(doc["folds"], "folds", allow_all=True)
    if folds == ["all"]:
        return folder, list(range(count))
    _raise([lines.error("folds", index, message=f"fold {fold} is out of range: the {doc['split']} split of "
                        f"{folder.name} has folds 0 to {count - 1} (calib_splits.json).")
            for index, fold in enumerate(folds) if fold >= count])
    return folder, folds


def _first_refusal(check: Callable, base: list, segments: list, where: str) -> str | None:
    """None when calib_train accepts ``base`` with every segment; else its message, at the line of the first
    segment it refuses on its own (at ``where`` when only their combination is refused)."""
    def refusal(argv):
        try:
            check(argv)
        except CalibnetError as e:
            return str(e)
        return None

    message = refusal(base + [token for argv, _ in segments for token in argv])
    if message is None:
        return None
    for argv, line in segments:
        alone = refusal(base + argv)
        if alone is not None:
            return f"{line}: {alone}"
    return f"{where}: {message}"


def _resumable(alias: str) -> bool:
    """Whether the method trains a network (so an interrupted attempt continues from its checkpoint)."""
    return bool(getattr(get_method(alias).trainer_class(), "trains", True))


def load_experiment(path: Path, parser: TrainParser, roots: DataRoots) -> Experiment:
    """Read and check an experiment file: keys and types, methods and their flags (with calib_train's parser
    and checks), confidence heads' bases (and their runs, for a base the grid does not train), prompt settings,
    the preprocessed dataset, configuration and folds. Every error names ``FILE:LINE``; nothing is written."""
    path = Path(path)
    doc, lines = _compose(path)
    _raise(_check_top_level(doc, lines))
    entries, flags, prompts = _read_methods(doc, lines, parser)
    dataset_folder, folds = _check_data(doc, lines, roots)
    seeds = _int_list(doc.get("seeds", [DEFAULT_SEED]), "seeds")
    resumable = _check_methods(doc, lines, parser, roots, entries, flags, prompts, folds[0], seeds[0])
    networks = [entry.alias for entry in entries if entry.base is None]
    _check_base_runs(doc, lines, roots, [e for e in entries if e.base is not None and e.base not in networks],
                     folds, seeds)
    name = doc.get("name") or path.stem
    cells = [_cell(doc, entry, fold, seed, flags[entry.index], prompts if METHODS[entry.alias].uses_sam else [],
                   dataset_folder.name, resumable[entry.index], roots, networks)
             for entry in entries for fold in folds for seed in seeds]
    evaluated = networks + [e.base for e in entries if e.base is not None and e.base not in networks]
    return Experiment(path, name, doc["dataset"], dataset_folder.name, doc["configuration"], doc["split"],
                      tuple(folds), tuple(seeds), tuple(entry.label for entry in entries), tuple(cells),
                      doc.get("evaluate", True), roots.results / dataset_folder.name / "experiments" / name,
                      tuple(dict.fromkeys(evaluated)))


def _read_methods(doc: dict, lines: _Lines, parser: TrainParser) -> tuple[list, dict, list]:
    """The method entries, each entry's flags ({flag: (argv, where)} by entry index, the method's own winning
    over train's; a head's base is not among them) and the prompt settings; every flag is a known calib_train
    flag written the way it takes its value."""
    entries, errors = _method_entries(doc, lines)
    train_flags = doc.get("train") or {}
    train, train_errors = _flag_segments(train_flags, lines, ("train",), parser, None)
    if "base" in train_flags:
        train_errors.append(lines.error("train", "base", message="--base is not given to every cell: give each "
                                        "confidence_head its own, `- confidence_head: {base: nnunet}`."))
    prompts, prompt_errors = _prompt_settings(doc, lines)
    flags = {}
    for entry in entries:
        segments, own_errors = _flag_segments(entry.own, lines, ("methods", entry.index, entry.alias), parser,
                                              entry.alias)
        flags[entry.index] = {**{k: v for k, v in train.items() if k != "base"}, **segments}
        errors += own_errors
    if prompts and not any(METHODS[entry.alias].uses_sam for entry in entries):
        errors.append(lines.error("prompts", message="prompt settings apply to SAM methods; no method listed is "
                                                     "one."))
    _raise(errors + train_errors + prompt_errors)
    return entries, flags, prompts


def _check_methods(doc: dict, lines: _Lines, parser: TrainParser, roots: DataRoots, entries: list, flags: dict,
                   prompts: list, fold: int, seed: int) -> dict:
    """calib_train's parser and checks on each entry's flags; returns {entry index: resumable}. A head's base
    run is not looked for here (the grid may train it): see _check_base_runs."""
    errors, resumable = [], {}
    common = [str(doc["dataset"]), doc["configuration"]]
    for entry in entries:
        segments = list(flags[entry.index].values())
        if METHODS[entry.alias].uses_sam and prompts:
            segments.append(([t for s in prompts for t in ("--prompts", s)], lines.at("prompts")))
        errors.append(_first_refusal(lambda argv: check_request(parser.parse(argv), roots.preprocessed),
                                     common + _cell_head(doc, entry, fold, seed), segments,
                                     lines.at("methods", entry.index)))
        try:
            resumable[entry.index] = entry.base is None and _resumable(entry.alias)
        except CalibnetError as e:
            errors.append(lines.error("methods", entry.index, message=str(e)))
    _raise(list(dict.fromkeys(e for e in errors if e)))
    return resumable


def _check_base_runs(doc: dict, lines: _Lines, roots: DataRoots, heads: list, folds: list, seeds: list) -> None:
    """Heads whose base is not a method of the grid read base runs trained before: every fold and seed of the
    grid must have one (calib_train's own check, made for each)."""
    errors = []
    for entry in heads:
        missing = []
        for fold in folds:
            for seed in seeds:
                spec = RunSpec(doc["dataset"], doc["configuration"], entry.alias, fold, doc["split"], seed)
                try:
                    check_base_run(spec, entry.base, roots.preprocessed, roots.results)
                except CalibnetError as e:
                    missing.append(str(e))
        if missing:
            more = f" ({len(missing)} of {len(folds) * len(seeds)} {entry.base} runs are missing)" \
                if len(missing) > 1 else ""
            errors.append(lines.error("methods", entry.index, entry.alias, "base", message=(
                f"{entry.label}: {entry.base} is not a method of this grid, so its runs must be trained already "
                f"(or list {entry.base} under methods): {missing[0].rstrip('.')}{more}.")))
    _raise(errors)


def _cell_head(doc: dict, entry: _Entry, fold: int, seed: int) -> list:
    """The start of a cell's calib_train argv: method, fold, split, seed (and a head's base)."""
    return [entry.alias, str(fold), "--split", doc["split"], "--seed", str(seed)] + \
        (["--base", entry.base] if entry.base is not None else [])


def _cell(doc: dict, entry: _Entry, fold: int, seed: int, flags: dict, prompts: list, dataset_name: str,
          resumable: bool, roots: DataRoots, networks: list) -> Cell:
    split = doc["split"]
    argv = [str(doc["dataset"]), doc["configuration"], *_cell_head(doc, entry, fold, seed),
            *[t for argv, _ in flags.values() for t in argv], *[t for s in prompts for t in ("--prompts", s)]]
    method = entry.alias if entry.base is None else entry.base
    spec = RunSpec(doc["dataset"], doc["configuration"], method, fold, split, seed)
    folder = run_folder(roots.results, dataset_name, get_method(method).class_name, spec)
    name = f"{entry.label}_{split}_fold{fold}_seed{seed}"
    if entry.base is None:
        return Cell(name, entry.alias, fold, seed, tuple(argv), folder, tuple(prompts), resumable)
    from calibnet.inference.confidence_heads import HEAD_CHECKPOINT
    from calibnet.networks.confidence_head import HEAD_FOLDERS, head_folder

    head = head_folder(folder, entry.adversarial)
    target = HeadTarget(folder, head / HEAD_CHECKPOINT, f"{HEAD_FOLDERS[head.name]}_predicted_dice")
    base_cell = f"{entry.base}_{split}_fold{fold}_seed{seed}" if entry.base in networks else None
    return Cell(name, entry.alias, fold, seed, tuple(argv), head, (), False, target, base_cell)
