"""FIP's cost and how close each ``--fip-estimator`` comes to the exact gradient, in one run; prints JSON.

    python benchmarks/fip_estimator.py [--shape 64] [--steps 8] [--device cpu] [--sam-model litemedsam|tiny ...]
                                       [--only sam|unet]

On the synthetic benchmark (built in a temporary CALIBNET_DATA), for each family — calsam vs samft on the SAM
decoder (LiteMedSAM unless told otherwise; one batch of 8 real slices) and calunet vs nnunet (3d_fullres, one
real augmented batch from nnU-Net's dataloader):

- mean seconds of a training step of the baseline and of the FIP method with ``exact``; with ``amortised`` the
  steps that take FIP afresh and those that reuse its gradient are timed apart, and its figure is
  (fresh + (k − 1) · reuse) / k; the ratios to the baseline;
- at the same weights, on ``--batches`` further real batches: the cosine similarity of the whole training gradient
  of a step that reuses batch 0's FIP gradient (what ``amortised`` does between refreshes) to the exact gradient of
  that batch (mean and minimum), the cosine between the two FIP gradients, and FIP's share of the gradient's norm
  (how much the penalty steers a step at all).
Gradients are taken at the same weights (no optimiser step between them): what staleness in the weights adds
during training is not measured here (docs/losses.md gives the training runs that compare the estimators).
"""
from __future__ import annotations

import argparse
import json
import os
import platform

import torch


def _mean_step_seconds(trainer, batch, steps: int, device: str, fresh=None) -> float:
    """Mean seconds of a training step; ``fresh`` (True/False) fixes whether it takes FIP afresh."""
    from common import step_times

    original = trainer.fip_due
    if fresh is not None:
        trainer.fip_due = lambda: fresh or not trainer.network.training
    try:
        trainer.step_in_epoch = 0
        times = step_times(lambda: trainer.train_step(batch), steps, device)
    finally:
        trainer.fip_due = original
    return sum(times) / len(times)


def _amortised_step_seconds(trainer, batch, steps: int, device: str, name: str) -> dict:
    """An amortised step's expected seconds: (one fresh step + (k − 1) reusing steps) / k, each kind timed apart."""
    every = trainer.fip_every
    fresh = _mean_step_seconds(trainer, batch, steps, device, True)
    reuse = _mean_step_seconds(trainer, batch, steps, device, False)
    return {f"{name}_amortised_fresh_step_seconds": fresh, f"{name}_amortised_reuse_step_seconds": reuse,
            f"{name}_amortised_step_seconds": (fresh + (every - 1) * reuse) / every}


def _flat_gradient(trainer, loss) -> torch.Tensor:
    parameters = [p for p in trainer.network.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, parameters, allow_unused=True, retain_graph=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, parameters)])


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))


def _estimator_accuracy(trainer, terms_of, batches: list) -> dict:
    """At the same weights, for batches 1..n: the whole training gradient of a step that reuses batch 0's FIP
    gradient (amortised) against that batch's exact one, and the two FIP gradients against each other."""
    trainer.fip_estimator = "exact"
    gradients = []
    for batch in batches:
        terms = terms_of(batch)
        rest = terms["segmentation loss"] + trainer.lambda_cmp * terms.get("CMP", 0)
        gradients.append((_flat_gradient(trainer, rest), _flat_gradient(trainer, trainer.lambda_fip * terms["FIP"])))
    kept = gradients[0][1]
    whole = [_cosine(rest + kept, rest + fip) for rest, fip in gradients[1:]]
    fip = [_cosine(kept, fip) for _, fip in gradients[1:]]
    share = [float(fip.norm() / (rest + fip).norm()) for rest, fip in gradients]
    return {"batches_compared": len(batches) - 1,
            "amortised_total_gradient_cosine_mean": round(sum(whole) / len(whole), 4),
            "amortised_total_gradient_cosine_min": round(min(whole), 4),
            "amortised_fip_gradient_cosine_mean": round(sum(fip) / len(fip), 4),
            "fip_share_of_gradient_norm_mean": round(sum(share) / len(share), 4)}


def _compare_estimators(trainer, batches: list, terms_of, args, name: str) -> dict:
    """Step seconds of the exact and amortised estimators on ``batches[0]``, and their gradients' agreement."""
    trainer.fip_estimator = "exact"
    result = {f"{name}_exact_step_seconds": _mean_step_seconds(trainer, batches[0], args.steps, args.device)}
    trainer.fip_estimator = "amortised"
    result.update(_amortised_step_seconds(trainer, batches[0], args.steps, args.device, name))
    result.update(_estimator_accuracy(trainer, terms_of, batches))
    return {**result, "amortised_every": trainer.fip_every}


def _sam_family(roots, args, config) -> dict:
    from common import sam_trainer

    result, batch = {}, None
    for method in ("samft", "calsam"):
        trainer, train_batches = sam_trainer(roots, method, config, args.device)
        batch = batch or next(train_batches)
        if method == "samft":
            result["samft_step_seconds"] = _mean_step_seconds(trainer, batch, args.steps, args.device)
            continue
        batches = [batch] + [next(train_batches) for _ in range(args.batches)]
        result.update(_compare_estimators(trainer, batches, lambda b, t=trainer: t.loss_terms(b["keys"]), args,
                                          "calsam"))
    result = {k: round(v, 4) if isinstance(v, float) and k.endswith("seconds") else v for k, v in result.items()}
    return {"sam": config.describe(), "slices_per_batch": len(batch["keys"]), **result,
            "calsam_exact_over_samft": round(result["calsam_exact_step_seconds"] / result["samft_step_seconds"], 3),
            "calsam_amortised_over_samft": round(result["calsam_amortised_step_seconds"]
                                                 / result["samft_step_seconds"], 3)}


def _unet_family(roots, args) -> dict:
    from calibnet.launch.training_run import prepare_trainer
    from calibnet.runs import RunSpec

    result, batch = {}, None
    for method in ("nnunet", "calunet"):
        trainer, *_ = prepare_trainer(RunSpec(501, "3d_fullres", method, 0), roots.preprocessed, roots.results,
                                      args.device)
        trainer.initialize()
        if batch is None:  # real batches: nnU-Net's sampling and augmentation, in this process
            os.environ["nnUNet_n_proc_DA"] = "0"
            train_loader, _ = trainer.get_dataloaders()
            batches = [next(train_loader) for _ in range(args.batches + 1)]
            batch = batches[0]
            for loader in (train_loader, _):
                getattr(loader, "_finish", lambda: None)()
        if method == "nnunet":
            result["nnunet_step_seconds"] = _mean_step_seconds(trainer, batch, args.steps, args.device)
            continue

        def terms_of(b, t=trainer):
            return t.loss_terms(b["data"].to(t.device), [y.to(t.device) for y in b["target"]])

        result.update(_compare_estimators(trainer, batches, terms_of, args, "calunet"))
        data = batch["data"]
        patch, batch_size = list(trainer.configuration_manager.patch_size), data.shape[0]
    result = {k: round(v, 4) if isinstance(v, float) and k.endswith("seconds") else v for k, v in result.items()}
    return {"patch_size": patch, "batch_size": batch_size, **result,
            "calunet_exact_over_nnunet": round(result["calunet_exact_step_seconds"] / result["nnunet_step_seconds"], 3),
            "calunet_amortised_over_nnunet": round(result["calunet_amortised_step_seconds"]
                                                   / result["nnunet_step_seconds"], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, default=64)
    parser.add_argument("--steps", type=int, default=6, help="timed steps of each kind")
    parser.add_argument("--batches", type=int, default=6, help="real batches whose gradients are compared")
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
