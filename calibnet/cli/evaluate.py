"""calib_evaluate: per-domain accuracy, generalisation gap, calibration and failure detection tables."""
from __future__ import annotations

import click

from calibnet import api
from calibnet.cli.common import data_roots, user_errors


def _csv(value, cast=str):
    return [cast(v) for v in value.split(",")] if value else None


def _int_list(_ctx, param, value):
    """``--folds 0,2`` → [0, 2]; anything else is a usage error naming the option."""
    try:
        return _csv(value, int)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers, e.g. 0,1.",
                                 param=param) from None


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--split", type=click.Choice(["loco", "scanner"]), required=True, help="Split family to evaluate.")
@click.option("-d", "--dataset-id", type=int, default=None, help="Needed only when several datasets have results.")
@click.option("--methods", default=None, help="Comma-separated method aliases (default: every trained one).")
@click.option("--folds", default=None, callback=_int_list, help="Comma-separated folds (default: all).")
@click.option("--seeds", default=None, callback=_int_list, help="Comma-separated seeds (default: all).")
@click.option("--configuration", "configurations", default=None,
              help="Comma-separated nnU-Net configurations (2d, 3d_fullres, ...; default: all, each in rows of its "
                   "own).")
@click.option("--seed", type=click.IntRange(0), default=0, show_default=True,
              help="Seed of the voxel subsampling for post-hoc fits.")
@user_errors
def main(split, dataset_id, methods, folds, seeds, configurations, seed):
    """Evaluate every trained method of a split; writes $nnUNet_results/DatasetXXX/evaluation/SPLIT/."""
    roots = data_roots()
    result = api.evaluate(split, dataset_id, _csv(methods), folds, seeds, _csv(configurations), seed, roots)
    for message in result.missing:
        click.echo(f"missing: {message}", err=True)
    click.echo(result.report)
    click.echo(f"report: {result.folder / 'report.md'}")


if __name__ == "__main__":
    main()
