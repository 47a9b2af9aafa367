"""calib_evaluate: per-domain accuracy, generalisation gap, calibration and failure detection tables."""
from __future__ import annotations

import os

import click

from calibnet import api
from calibnet.cli.common import DATASET, CalibCommand, data_roots, user_errors


def _csv(value, cast=str):
    return [cast(v) for v in value.split(",")] if value else None


def _int_list(_ctx, param, value):
    """``--folds 0,2`` → [0, 2]; anything else is a usage error naming the option."""
    try:
        return _csv(value, int)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers, e.g. 0,1.",
                                 param=param) from None


@click.command(cls=CalibCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--split", type=click.Choice(["loco", "scanner"]), required=True,
              help="Split family to evaluate (required; no default).")
@click.option("-d", "--dataset-id", type=DATASET, default=None,
              help="Id (501), folder name (Dataset501_SynthBrain) or name; needed only when several datasets have "
                   "results (default: the only dataset with results).")
@click.option("--methods", default=None, help="Comma-separated method aliases (default: every trained one).")
@click.option("--folds", default=None, callback=_int_list,
              help="Comma-separated fold numbers (default: every fold with a run; external predictions are scored on "
                   "the same folds).")
@click.option("--seeds", default=None, callback=_int_list,
              help="Comma-separated training seeds of the runs (default: all).")
@click.option("--configuration", "configurations", default=None,
              help="Comma-separated nnU-Net configurations (2d, 3d_fullres, ...; default: all, each in rows of its "
                   "own).")
@click.option("--seed", type=click.IntRange(0), default=0, show_default=True,
              help="Seed of the voxel subsampling for post-hoc fits (not a training seed: see --seeds).")
@click.option("--predictions", "predictions", multiple=True, type=click.Path(file_okay=False),
              help="Folder of nnU-Net-format predictions made elsewhere (CASE.nii.gz, optional CASE.npz "
                   "probabilities) to score beside the runs; repeatable, each with its --name (default: none).")
@click.option("--name", "names", multiple=True,
              help="Row label of the --predictions folder given at the same position; not a method name "
                   "(default: none).")
@click.option("-np", "--num-processes", type=click.IntRange(1), default=min(4, os.cpu_count() or 1),
              show_default="min(4, CPU cores)",
              help="Worker processes scoring cases in parallel, at most one per 16 cases (the results are the same "
                   "for any number).")
@user_errors
def main(split, dataset_id, methods, folds, seeds, configurations, seed, predictions, names, num_processes):
    """Evaluate every trained method of a split; writes $nnUNet_results/DatasetXXX/evaluation/SPLIT/."""
    roots = data_roots()
    result = api.evaluate(split, dataset_id, _csv(methods), folds, seeds, _csv(configurations), seed, roots,
                          predictions, names, num_processes=num_processes)
    for message in result.missing:
        click.echo(f"missing: {message}", err=True)
    click.echo(result.report)
    click.echo(f"report: {result.folder / 'report.md'}")


if __name__ == "__main__":
    main()
