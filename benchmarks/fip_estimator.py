"""FIP's cost and how close each ``--fip-estimator`` comes to the exact gradient, in one run; prints JSON.

    python benchmarks/fip_estimator.py [--shape 64] [--steps 8] [--device cpu] [--sam-model litemedsam|tiny ...]
                                       [--only sam|unet]

On the synthetic benchmark (built in a temporary CALIBNET_DATA), for each family — calsam vs samft on the SAM
decoder (LiteMedSAM unless told otherwise; one batch of 8 real slices) and calunet vs nnunet (3d_fullres, one
real augmented batch from nnU-Net's dataloader):

- mean seconds of a training step of the baseline, of the FIP method with ``exact`` and with ``sampled``, and
  their ratios to the baseline; a sampled estimator that takes FIP on only some steps is timed on steps with and
  without FIP apart, and its figure is their mean weighted by how often each happens;
- cosine similarity of the parameter gradient of the whole training loss (segmentation + λ1·FIP + λ2·CMP)
  under ``sampled`` to the one under ``exact``, per draw (mean and minimum over the draws of ``--steps`` steps);
- the unbiasedness check: the expectation of the sampled FIP gradient, enumerated over every sample it can
  draw, against the exact FIP gradient (cosine and max relative difference; 1 and ~1e-6 if unbiased);
- the cosine of one draw's FIP gradient to the exact one (how noisy a single step's estimate is).
Gradients are taken at the same weights (no optimiser step between them).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
from dataclasses import replace

import torch


def _mean_step_seconds(trainer, batch, steps: int, device: str, draw=None) -> float:
    """Mean seconds of a training step; ``draw`` (samples, weight) fixes what FIP is taken on."""
    from common import step_times

    original = trainer.fip_draw
    if draw is not None:
        trainer.fip_draw = lambda batch_size: draw
    try:
        trainer.step_in_epoch = 0
        times = step_times(lambda: trainer.train_step(batch), steps, device)
    finally:
        trainer.fip_draw = original
    return sum(times) / len(times)


def _sampled_step_seconds(trainer, batch, steps: int, device: str, name: str) -> dict:
    """A sampled step's expected seconds: the share of steps that take FIP (rate/⌈rate⌉) times the seconds of
    such a step (⌈rate⌉ samples) plus the rest times those of a step without FIP (timed apart, so that the mean
    does not depend on how a few draws fell)."""
    import math

    count = math.ceil(trainer.fip_rate)
    share = trainer.fip_rate / count
    with_fip = _mean_step_seconds(trainer, batch, steps, device, (list(range(count)), 1.0 / share))
    without = _mean_step_seconds(trainer, batch, steps, device, ([], 0.0)) if share < 1 else 0.0
    return {f"{name}_sampled_step_with_fip_seconds": with_fip,
            **({f"{name}_sampled_step_without_fip_seconds": without} if share < 1 else {}),
            f"{name}_sampled_step_seconds": share * with_fip + (1 - share) * without}


def _flat_gradient(trainer, loss) -> torch.Tensor:
    parameters = [p for p in trainer.network.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, parameters, allow_unused=True, retain_graph=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, parameters)])


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))


def _gradients(trainer, terms_of, draw=None) -> tuple:
    """(gradient of the whole loss, gradient of the FIP term) with the trainer's estimator or a fixed draw."""
    original = trainer.fip_draw
    if draw is not None:
        trainer.fip_draw = lambda batch: draw
    try:
        terms = terms_of()
    finally:
        trainer.fip_draw = original
    total = terms["segmentation loss"] + trainer.lambda_fip * terms["FIP"] + trainer.lambda_cmp * terms.get("CMP", 0)
    fip = _flat_gradient(trainer, terms["FIP"]) if terms["FIP"].requires_grad else None
    return _flat_gradient(trainer, total), fip


def _estimator_accuracy(trainer, terms_of, batch_size: int, steps: int) -> dict:
    trainer.fip_estimator = "exact"
    exact_total, exact_fip = _gradients(trainer, terms_of)
    trainer.fip_estimator = "sampled"
    totals, single_fip = [], []
    for step in range(steps):
        trainer.step_in_epoch = step
        total, fip = _gradients(trainer, terms_of)
        totals.append(_cosine(total, exact_total))
        single_fip.append(_cosine(fip, exact_fip) if fip is not None else 0.0)
    # E[estimate] = mean over samples b of sample b's own FIP (the estimator's draw weight cancels its probability)
    expected = sum(_gradients(trainer, terms_of, ([b], 1.0))[1] for b in range(batch_size)) / batch_size
    return {"sampled_total_gradient_cosine_mean": round(sum(totals) / len(totals), 5),
            "sampled_total_gradient_cosine_min": round(min(totals), 5),
            "sampled_fip_gradient_cosine_one_draw_mean": round(sum(single_fip) / len(single_fip), 4),
            "sampled_expected_fip_gradient_cosine": round(_cosine(expected, exact_fip), 7),
            "sampled_expected_fip_gradient_max_relative_difference":
                float((expected - exact_fip).abs().max() / exact_fip.abs().max())}


def _sam_family(roots, args, config) -> dict:
    from calibnet.launch.training_run import prepare_trainer
    from calibnet.networks.sam_backbone import sam_image_channel
    from calibnet.runs import RunSpec

    result, batch = {}, None
    for method in ("samft", "calsam"):
        trainer, *_ = prepare_trainer(RunSpec(501, "3d_fullres", method, 0), roots.preprocessed, roots.results,
                                      args.device)
        trainer.sam_config = replace(config, image_channel=sam_image_channel(
            config, trainer.dataset_json["channel_names"], trainer.unit_intensities(config)))
        trainer.initialize()
        train_batches, _ = trainer.get_dataloaders()
        batch = batch or next(train_batches)
        if method == "samft":
            result["samft_step_seconds"] = _mean_step_seconds(trainer, batch, args.steps, args.device)
            continue
        trainer.fip_estimator = "exact"
        result["calsam_exact_step_seconds"] = _mean_step_seconds(trainer, batch, args.steps, args.device)
        trainer.fip_estimator = "sampled"
        result.update(_sampled_step_seconds(trainer, batch, args.steps, args.device, "calsam"))
        result.update(_estimator_accuracy(trainer, lambda t=trainer: t.loss_terms(batch["keys"]),
                                          len(batch["keys"]), args.steps))
        result["sampled_rate"] = trainer.fip_rate
    result = {k: round(v, 4) if isinstance(v, float) and k.endswith("seconds") else v for k, v in result.items()}
    return {"sam": config.describe(), "slices_per_batch": len(batch["keys"]), **result,
            "calsam_exact_over_samft": round(result["calsam_exact_step_seconds"] / result["samft_step_seconds"], 3),
            "calsam_sampled_over_samft": round(result["calsam_sampled_step_seconds"]
                                               / result["samft_step_seconds"], 3)}


def _unet_family(roots, args) -> dict:
    from calibnet.launch.training_run import prepare_trainer
    from calibnet.runs import RunSpec

    result, batch = {}, None
    for method in ("nnunet", "calunet"):
        trainer, *_ = prepare_trainer(RunSpec(501, "3d_fullres", method, 0), roots.preprocessed, roots.results,
                                      args.device)
        trainer.initialize()
        if batch is None:  # one real batch: nnU-Net's sampling and augmentation, in this process
            os.environ["nnUNet_n_proc_DA"] = "0"
            train_loader, _ = trainer.get_dataloaders()
            batch = next(train_loader)
            for loader in (train_loader, _):
                getattr(loader, "_finish", lambda: None)()
        if method == "nnunet":
            result["nnunet_step_seconds"] = _mean_step_seconds(trainer, batch, args.steps, args.device)
            continue
        trainer.fip_estimator = "exact"
        result["calunet_exact_step_seconds"] = _mean_step_seconds(trainer, batch, args.steps, args.device)
        trainer.fip_estimator = "sampled"
        result.update(_sampled_step_seconds(trainer, batch, args.steps, args.device, "calunet"))
        data = batch["data"].to(trainer.device)
        target = [t.to(trainer.device) for t in batch["target"]]
        result.update(_estimator_accuracy(trainer, lambda t=trainer: t.loss_terms(data, target),
                                          data.shape[0], args.steps))
        result["sampled_rate"] = trainer.fip_rate
        patch, batch_size = list(trainer.configuration_manager.patch_size), data.shape[0]
    result = {k: round(v, 4) if isinstance(v, float) and k.endswith("seconds") else v for k, v in result.items()}
    return {"patch_size": patch, "batch_size": batch_size, **result,
            "calunet_exact_over_nnunet": round(result["calunet_exact_step_seconds"] / result["nnunet_step_seconds"], 3),
            "calunet_sampled_over_nnunet": round(result["calunet_sampled_step_seconds"]
                                                 / result["nnunet_step_seconds"], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per estimator, and draws compared")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sam-model", default=None, help="default: litemedsam (the packaged LiteMedSAM)")
    parser.add_argument("--sam-checkpoint", default=None)
    parser.add_argument("--only", choices=("sam", "unet"), default=None)
    args = parser.parse_args()

    from calibnet.networks.sam_backbone import resolve_sam_config
    from common import temporary_benchmark_dataset

    config, _ = resolve_sam_config(args.sam_model, args.sam_checkpoint)
    result = {}
    with temporary_benchmark_dataset(args.shape, cases_per_center=2) as (roots, _):
        if args.only in (None, "sam"):
            result["sam"] = _sam_family(roots, args, config)
        if args.only in (None, "unet"):
            result["unet"] = _unet_family(roots, args)
    print(json.dumps({"benchmark": "fip_estimator", "device": args.device, "machine": platform.machine(),
                      "threads": torch.get_num_threads(), "steps": args.steps, **result}))


if __name__ == "__main__":
    main()
