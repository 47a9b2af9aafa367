"""calib_plan_and_preprocess: check, fingerprint, plan (CalibPlans), preprocess, write domain splits."""
from __future__ import annotations

import os

import click

from calibnet.cli.common import data_roots, parse_int_tuple, user_errors


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-d", "--dataset-id", type=int, required=True, help="nnU-Net dataset id, e.g. 501.")
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
    calib_splits.json (loco and scanner folds) and splits_final.json (the loco folds, for nnU-Net).
    """
    from calibnet.planners.plan_and_preprocess import plan_and_preprocess
    from calibnet.planners.splits import describe_fold

    roots = data_roots()
    patch = parse_int_tuple(patch_size, 3, "--patch-size") if patch_size else None
    result = plan_and_preprocess(dataset_id, roots.raw, roots.preprocessed, configurations=configurations,
                                 num_processes=num_processes, patch_size=patch, gpu_memory_target_gb=gpu_memory_gb,
                                 split_seed=split_seed, val_fraction=val_fraction, preprocess=not plan_only,
                                 log=click.echo)
    click.echo(f"\n{result.dataset_name}")
    for name, config in result.plans["configurations"].items():
        if "patch_size" in config:
            patch_text = "x".join(str(p) for p in config["patch_size"])
            click.echo(f"  {name:<11} patch {patch_text}, batch size {config['batch_size']}, "
                       f"spacing {', '.join(f'{s:.3g}' for s in config['spacing'])} mm")
    click.echo(f"  plans: {result.plans_file}")
    click.echo(f"  splits: {result.splits_file}")
    for family in ("loco", "scanner"):
        for fold in result.splits[family]["folds"]:
            click.echo(f"    {family:<7} {describe_fold(family, fold)}: {len(fold['train'])} train, "
                       f"{len(fold['val'])} val, {len(fold['test'])} test")
    if result.preprocessed_configurations:
        click.echo(f"  preprocessed: {', '.join(result.preprocessed_configurations)}")
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)


if __name__ == "__main__":
    main()
