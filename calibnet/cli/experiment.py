"""calib_experiment: a grid of calib_train runs (methods × folds × seeds) from one YAML file, resumable, on this
machine or on SLURM through submitit, then calib_evaluate."""
from __future__ import annotations

from pathlib import Path

import click

from calibnet import api
from calibnet.cli import train
from calibnet.cli.common import CalibCommand, data_roots, user_errors
from calibnet.errors import CalibnetError


def train_parser() -> api.TrainParser:
    """calib_train's own flags and parser, with which every cell of an experiment is checked."""
    flags = {}
    for param in train.main.params:
        if isinstance(param, click.Option):
            kind = api.FlagKind(is_flag=param.is_flag, multiple=param.multiple)
            flags.update({opt[2:]: kind for opt in param.opts + param.secondary_opts if opt.startswith("--")})
    return api.TrainParser(flags, _parse_train)


def _parse_train(argv) -> api.TrainRequest:
    try:
        with train.main.make_context("calib_train", list(argv)) as ctx:
            return train._request(ctx.params)
    except click.ClickException as e:
        raise CalibnetError(e.format_message()) from None


@click.command(cls=CalibCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("experiment_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--executor", type=click.Choice(["local", "submitit-local", "slurm"]), default="local",
              show_default=True, help="local: cells as subprocesses of this command; submitit-local: submitit's "
              "local jobs (the SLURM code path on this machine); slurm: a SLURM array job through submitit.")
@click.option("-j", "--jobs", type=click.IntRange(1), default=None,
              help="Cells at once (local, submitit-local: default 1; slurm: the array's parallelism, default no "
                   "limit).")
@click.option("--dry-run", is_flag=True, help="Check the file, print every cell with its state and run nothing.")
@click.option("--no-wait", is_flag=True,
              help="slurm: return once the jobs are submitted, printing their ids; a rerun collects them and "
                   "evaluates.")
@click.option("--partition", default=None, help="slurm: the partition.  [default: the cluster's default partition]")
@click.option("--time", "time_min", type=click.IntRange(1), default=None,
              help="slurm (required): minutes one cell may run; submitit-local: default 7 days.")
@click.option("--gpus-per-job", type=click.IntRange(0), default=None,
              help="slurm, submitit-local: GPUs of each cell (submitit's local jobs see none unless given).")
@click.option("--cpus-per-job", type=click.IntRange(1), default=None,
              help="slurm: CPUs of each cell.  [default: the cluster's default]")
@click.option("--mem-gb", type=click.FloatRange(0, min_open=True), default=None,
              help="slurm: memory of each cell, in GB.  [default: the cluster's default]")
@user_errors
def main(experiment_file, executor, jobs, dry_run, no_wait, partition, time_min, gpus_per_job, cpus_per_job,
         mem_gb):
    """Run the grid of EXPERIMENT_FILE (YAML: dataset, configuration, split, folds, seeds, methods with their
    flags; see docs/calib_experiment.md): one calib_train run per method, fold and seed (confidence heads after
    their base runs), skipping those already finished, then calib_evaluate. Exits with status 1 while a cell has
    not finished."""
    roots = data_roots()
    options = api.ExperimentOptions(executor=executor, jobs=jobs, dry_run=dry_run, wait=not no_wait,
                                    partition=partition, time_min=time_min, gpus_per_job=gpus_per_job,
                                    cpus_per_job=cpus_per_job, mem_gb=mem_gb)
    result = api.experiment(experiment_file, train_parser(), options, roots, log=click.echo)
    for line in result.lines:
        click.echo(line)
    if result.evaluation is not None:
        for message in result.evaluation.missing:
            click.echo(f"missing: {message}", err=True)
        click.echo(result.evaluation.report)
        click.echo(f"report: {result.evaluation.folder / 'report.md'}")
    if not (dry_run or no_wait or result.grid.complete):
        click.get_current_context().exit(1)


if __name__ == "__main__":
    main()
