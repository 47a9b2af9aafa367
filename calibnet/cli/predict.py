"""calib_predict: segment new images with a trained calibnet model."""
from __future__ import annotations

from pathlib import Path

import click

from calibnet import api
from calibnet.cli.common import DATASET, CalibCommand, ManyValuesOption, data_roots, user_errors
from calibnet.runs import MODEL_CHECKPOINTS


def _folds(_ctx, param, values):
    """-f values → "all" or a tuple of distinct fold numbers."""
    if "all" in values:
        if len(values) > 1:
            raise click.BadParameter("give fold numbers or all, not both.", param=param)
        return "all"
    try:
        folds = tuple(int(v) for v in values)
    except ValueError:
        raise click.BadParameter(f"{' '.join(values)}: give fold numbers (-f 0 1) or all.", param=param) from None
    if len(set(folds)) < len(folds):
        raise click.BadParameter(f"fold {' '.join(values)}: a fold is given twice.", param=param)
    return folds


@click.command(cls=CalibCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-d", "--dataset-id", type=DATASET, required=True,
              help="Dataset the model was trained on: its id (501), folder name (Dataset501_SynthBrain) or name.")
@click.option("-m", "--method", required=True, help="Method alias (calib_train --list).")
@click.option("-f", "--fold", "folds", cls=ManyValuesOption, required=True, callback=_folds, metavar="FOLD...|all",
              help="Fold(s) of the training run: one (-f 0), several (-f 0 1 2 or -f 0 -f 1), or all (every fold "
                   "with a finished run of this method, configuration, split and seed). Several folds are "
                   "ensembled as nnU-Net does: the mean of their logits, then softmax and argmax.")
@click.option("-c", "--configuration", default="3d_fullres", show_default=True, help="nnU-Net configuration.")
@click.option("--split", type=click.Choice(["loco", "scanner"]), default="loco", show_default=True,
              help="Split family of the training run.")
@click.option("--seed", type=int, default=42, show_default=True, help="Seed of the training run to use.")
@click.option("-i", "--input-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="Images named CASE_0000.nii.gz, CASE_0001.nii.gz, ... (one file per channel).")
@click.option("-o", "--output-dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Where the predictions go: not -i nor inside it; a folder holding predictions needs --overwrite.")
@click.option("--overwrite", is_flag=True,
              help="Replace the predictions already in OUTPUT_DIR (its segmentations, .npz, confidence.json and "
                   "prompts.json; other files stay), once the new ones are all written. Default: off (refused).")
@click.option("--save-probabilities/--no-save-probabilities", default=True, show_default=True,
              help="Write CASE.npz with the softmax probabilities (float32).")
@click.option("--disable-tta", is_flag=True, help="No mirroring test-time augmentation. Default: off (mirroring).")
@click.option("--step-size", type=click.FloatRange(0, 1, min_open=True), default=0.5, show_default=True,
              help="Sliding-window step, as a fraction of the patch size (nnU-Net's -step_size).")
@click.option("--checkpoint", type=click.Choice(list(MODEL_CHECKPOINTS)), default=None,
              help="Checkpoint file of each run (nnU-Net's -chk). Default: checkpoint_final.pth, else "
                   "checkpoint_best.pth, else checkpoint_latest.pth.")
@click.option("--mc-samples", type=click.IntRange(2), multiple=True,
              help="N MC-dropout samples per case (nnunet_dropout models; N >= 2, one dropout forward each, no "
                   "mirroring): adds mc_dice_agreement_nN, mc_nsd_agreement_nN and mc_mean_entropy_nN. Repeat for "
                   "several N (--mc-samples 2 --mc-samples 15): max(N) samples, the first N for each. Default: off; "
                   "one fold only.")
@click.option("--confidence", is_flag=True,
              help="Require the run's confidence heads (calib_train ... confidence_head --base METHOD) and print "
                   "each case's predicted Dice and NSD; their scores go to confidence.json whenever heads exist. "
                   "Default: off; one fold only.")
@click.option("--flag-below", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="With --confidence: warn about cases whose predicted Dice (0 to 1) is below this, for review.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None,
              help="Where to predict. Default: cuda when available.")
@click.option("--prompts", "prompt_setting", default=None,
              help="SAM methods: prompts of this prompt-quality setting (3P, 3B0.5, 3P+3B0.5, P50, B150, ...) "
                   "drawn from the --prompts-from labels instead of the method's own. Default: the method's own.")
@click.option("--prompts-from", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Folder of CASE.nii.gz labels to derive the prompts from (guided_nnunet and SAM methods). "
                   "Default: none.")
@user_errors
def main(dataset_id, method, folds, configuration, split, seed, input_dir, output_dir, overwrite, save_probabilities,
         disable_tta, step_size, checkpoint, mc_samples, confidence, flag_below, device, prompt_setting, prompts_from):
    """Predict every case in INPUT_DIR with the model trained by calib_train DATASET CONFIGURATION METHOD FOLD
    (several folds: their ensemble); writes segmentations, probabilities and confidence.json to OUTPUT_DIR."""
    roots = data_roots()
    request = api.PredictRequest(dataset_id, method, folds, input_dir, output_dir, configuration=configuration,
                                 split=split, seed=seed, save_probabilities=save_probabilities,
                                 use_mirroring=not disable_tta, mc_samples=mc_samples, confidence=confidence,
                                 flag_below=flag_below, device=device, prompt_setting=prompt_setting,
                                 prompts_from=prompts_from, overwrite=overwrite, checkpoint=checkpoint,
                                 step_size=step_size)
    for line in api.predict(request, roots).lines:
        click.echo(line)


if __name__ == "__main__":
    main()
