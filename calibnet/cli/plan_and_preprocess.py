"""calib_plan_and_preprocess: check, fingerprint, plan (CalibPlans), preprocess, write domain splits."""
from __future__ import annotations

import os

import click

from calibnet import api
from calibnet.cli.common import DATASET, CalibCommand, data_roots, parse_int_tuple, user_errors


@click.command(cls=CalibCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-d", "--dataset-id", type=DATASET, required=True,
              help="nnU-Net dataset: id (501), folder name (Dataset501_SynthBrain) or name.")
@click.option("-c", "--configurations", multiple=True, default=("2d", "3d_fullres"), show_default=True,
              type=click.Choice(["2d", "3d_fullres", "3d_lowres"]),
              help="Configurations to preprocess (repeat the flag for several). All are planned.")
@click.option("-np", "--num-processes", type=click.IntRange(1), default=min(4, os.cpu_count() or 1),
              show_default=True, help="Worker processes for checks, fingerprinting and preprocessing.")
@click.option("--patch-size", default=None,
              help="Force the 3d_fullres patch, e.g. 96,128,128 (nnU-Net's transposed axis order). "
                   "Default: 128³ where the median shape allows, else clipped to it.")
@click.option("--gpu-memory-gb", type=float, default=8, show_default=True,
              help="nnU-Net's GPU memory target, used for the batch size.")
@click.option("--split-seed", type=int, default=12345, show_default=True, help="Seed of the in-domain val split.")
@click.option("--val-fraction", type=float, default=0.2, show_default=True,
              help="Share of each source center held out as in-domain validation.")
@click.option("--plan-only", is_flag=True, help="Check, fingerprint, plan and write splits; skip preprocessing.")
@user_errors
def main(dataset_id, configurations, num_processes, patch_size, gpu_memory_gb, split_seed, val_fraction, plan_only):
    """Plan and preprocess a calibnet dataset for nnU-Net, with leave-one-center-out and scanner splits.

    Writes to $nnUNet_preprocessed/DatasetXXX_NAME: CalibPlans.json, the preprocessed data,
    calib_splits.json (loco and scanner folds) and splits_final.json (the loco folds, for nnU-Net; an existing
    splits_final.json that calibnet did not write is left as it is).
    """
    roots = data_roots()
    patch = parse_int_tuple(patch_size, 3, "--patch-size") if patch_size else None
    result = api.plan_and_preprocess(dataset_id, configurations=configurations, num_processes=num_processes,
                                     patch_size=patch, gpu_memory_gb=gpu_memory_gb, split_seed=split_seed,
                                     val_fraction=val_fraction, plan_only=plan_only, roots=roots, log=click.echo)
    for line in result.lines:
        click.echo(line)
    for warning in result.warnings:
        click.echo(warning, err=True)


if __name__ == "__main__":
    main()
