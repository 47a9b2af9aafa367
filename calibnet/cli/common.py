"""What every calibnet command shares: data roots printed once, user errors as one clean line, ``-d`` read as
nnU-Net reads it, and nnU-Net's spellings of options (``-chk``, ``-device``, ``--disable_tta``) mapped or refused
rather than misparsed."""
from __future__ import annotations

import difflib
import functools
import re

import click

from calibnet.errors import CalibnetError, UsageError
from calibnet.paths import DataRoots, data_roots_in_use, dataset_id_of, setup_data_roots


def data_roots() -> DataRoots:
    """Set up the nnU-Net roots from CALIBNET_DATA and print them."""
    roots = setup_data_roots()
    click.echo(roots.describe())
    return roots


def user_errors(command):
    """Turn :class:`CalibnetError` into click's one-line ``Error: ...`` and exit status 1 (a
    :class:`UsageError` into click's usage error, status 2)."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except UsageError as e:
            raise click.UsageError(str(e)) from None
        except CalibnetError as e:
            raise click.ClickException(str(e)) from None
    return wrapper


def parse_int_tuple(text: str, length: int, option: str) -> tuple:
    """``"64"`` → (64,)*length; ``"64,80,64"`` → (64, 80, 64)."""
    try:
        values = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a list of integers", param_hint=option) from None
    if len(values) == 1:
        values = values * length
    if len(values) != length:
        raise click.BadParameter(f"give one integer or {length} separated by commas, not {text!r}",
                                 param_hint=option)
    return values


class DatasetParam(click.ParamType):
    """``-d``: an id (``501``), a folder name (``Dataset501_SynthBrain``) or a dataset name (``SynthBrain``), read
    as nnU-Net reads it (``calibnet.paths.dataset_id_of``); the command gets the id."""
    name = "DATASET"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        try:
            return dataset_id_of(value, data_roots_in_use())
        except CalibnetError as e:
            self.fail(str(e), param, ctx)


DATASET = DatasetParam()


class ManyValuesOption(click.Option):
    """A repeatable option that also takes several values after one flag, as argparse's ``nargs="+"`` of
    nnU-Net does (``-f 0 1 2`` = ``-f 0 -f 1 -f 2``); for commands without positional arguments
    (:class:`CalibCommand` spreads the values)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, multiple=True, **kwargs)


# nnU-Net's spellings (nnUNetv2_predict, _train, _plan_and_preprocess) -> calibnet's option, mapped where the command
# has it; and those calibnet has no equivalent of, with what to do instead
NNUNET_SPELLINGS = {
    "-device": "--device", "-chk": "--checkpoint", "-step_size": "--step-size", "-num_gpus": "--num-gpus",
    "-gpu_memory_target": "--gpu-memory-gb", "-npfp": "--num-processes", "--c": "--continue",
}
NNUNET_REFUSED = {
    "-tr": "calibnet has no -tr: name the method (calib_train --list)",
    "-p": "calibnet has no -p: every calibnet run uses the plans CalibPlans of calib_plan_and_preprocess",
    "-pl": "calibnet has no -pl: calib_plan_and_preprocess plans with calibnet's CalibPlanner",
    "-npp": "calibnet has no -npp: calib_predict preprocesses each case in its own process",
    "-nps": "calibnet has no -nps: calib_predict exports each case in its own process",
    "-num_parts": "calibnet has no -num_parts: run one calib_predict per folder of images",
    "-part_id": "calibnet has no -part_id: run one calib_predict per folder of images",
    "-prev_stage_predictions": "calibnet has no -prev_stage_predictions: it trains no cascade",
    "-pretrained_weights": "calibnet has no -pretrained_weights (SAM methods take --sam-checkpoint)",
    "--val": "calibnet spells it --predict-only (predicts a trained run's val and test cases again)",
    "--npz": "calibnet has no --npz: calib_train always writes the val and test probabilities (.npz)",
    "--continue_prediction": "calibnet has no --continue_prediction: calib_predict writes its output whole; "
                             "predict again (--overwrite)",
}
_WORD_OPTION = re.compile(r"-[A-Za-z][A-Za-z_]+")  # one dash, 2+ letters: never a cluster of short options


class CalibCommand(click.Command):
    """A click command that reads nnU-Net's habits instead of misparsing them: a single-dash word (``-chk``,
    ``-device``) is never split into short options (click reads ``-chk`` as ``-c hk``), and neither it nor an
    unknown ``--snake_case`` option is guessed at: each is mapped to calibnet's option where the command has an
    equivalent (a note on stderr says so), else refused naming calibnet's spelling. Values of
    :class:`ManyValuesOption` given after one flag are spread over repeated flags."""

    def parse_args(self, ctx, args):
        return super().parse_args(ctx, self._translate(ctx, list(args)))

    def _translate(self, ctx, args: list) -> list:
        options = {o: p for p in self.get_params(ctx) if isinstance(p, click.Option)
                   for o in p.opts + p.secondary_opts}
        takes_value = {o for o, p in options.items() if not p.is_flag and not p.count}
        out, i = [], 0
        while i < len(args):
            token = args[i]
            if token == "--":
                return out + args[i:]
            name, equals, value = token.partition("=")
            if name not in options and (_WORD_OPTION.fullmatch(name) or name in NNUNET_REFUSED
                                        or name in NNUNET_SPELLINGS or name.startswith("--") and "_" in name):
                name = self._calibnet_spelling(ctx, name, options)
                token = name + equals + value
            out.append(token)
            i += 1
            if name in options and isinstance(options[name], ManyValuesOption) and not equals:
                while i + 1 < len(args) and not args[i + 1].startswith("-"):
                    out += [args[i], name]
                    i += 1
            if name in takes_value and not equals and i < len(args):
                out.append(args[i])  # a value, even one that looks like an option
                i += 1
        return out

    def _calibnet_spelling(self, ctx, name: str, options: dict) -> str:
        """calibnet's option for nnU-Net's spelling ``name``, or a usage error saying how calibnet spells it."""
        if name in NNUNET_REFUSED:
            raise click.UsageError(f"{NNUNET_REFUSED[name]}.", ctx)
        target = NNUNET_SPELLINGS.get(name, "--" + name.lstrip("-").replace("_", "-"))
        if target in options:
            click.echo(f"note: {name} read as {target}", err=True)
            return target
        longs = sorted(o for o in options if o.startswith("--"))
        close = difflib.get_close_matches("--" + name.lstrip("-").replace("_", "-"), longs, n=1, cutoff=0.8)
        hint = f"; calibnet spells it {close[0]}" if close else ""
        raise click.UsageError(f"calibnet has no {name} in {ctx.command_path}{hint} (see --help).", ctx)
