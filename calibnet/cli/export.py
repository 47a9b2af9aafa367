"""calib_export: one trained run as an nnU-Net model folder that nnU-Net's own nnUNetv2_predict opens."""
from __future__ import annotations

from pathlib import Path

import click

from calibnet import api
from calibnet.cli.common import DATASET, CalibCommand, data_roots, user_errors


@click.command(cls=CalibCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("dataset_id", type=DATASET)
@click.argument("configuration")
@click.argument("method")
@click.argument("fold", type=click.IntRange(0))
@click.option("--split", type=click.Choice(["loco", "scanner"]), default="loco", show_default=True,
              help="Split family of calib_splits.json that FOLD indexes.")
@click.option("--seed", type=click.IntRange(0), default=42, show_default=True, help="Seed of the training run.")
@click.option("-o", "--output-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write a complete model folder here (dataset.json, plans.json, fold_FOLD/) for "
                   "nnUNetv2_predict_from_modelfolder -m OUTPUT_DIR. Default: fold_FOLD/ in the run's trainer folder, "
                   "where nnUNetv2_predict -tr TRAINER -p CalibPlans looks.")
@click.option("--overwrite", is_flag=True,
              help="Replace a fold_FOLD/ that holds another run (another split or seed) or a model calib_export did "
                   "not write, and -o model files of another dataset.")
@user_errors
def main(dataset_id, configuration, method, fold, split, seed, output_dir, overwrite):
    """Export the run of calib_train DATASET CONFIGURATION METHOD FOLD as nnU-Net's model of fold FOLD (network
    weights only), and print the nnU-Net command that predicts with it. nnU-Net-based methods only: SAM methods and
    guided_nnunet need prompts nnU-Net's predictor cannot give (use calib_predict)."""
    roots = data_roots()
    request = api.ExportRequest(dataset_id, configuration, method, fold, split=split, seed=seed,
                                output_dir=output_dir, overwrite=overwrite)
    for line in api.export(request, roots).lines:
        click.echo(line)


if __name__ == "__main__":
    main()
