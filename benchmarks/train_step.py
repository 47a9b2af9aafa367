"""Time one training step of nnunet vs calunet with exact FIP on the same batch (the FIP + CMP overhead); prints
JSON. benchmarks/fip_estimator.py compares the FIP estimators, calunet's default (amortised) included.

    python benchmarks/train_step.py [--shape 64] [--steps 10] [--device cpu]

Builds the synthetic benchmark in a temporary CALIBNET_DATA, plans and preprocesses 3d_fullres, then
times ``train_step`` of both trainers on one fixed random batch of the planned patch size and batch size
(median over ``--steps`` steps after two warm-up steps).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics

import torch


def _batch(trainer, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    patch = trainer.configuration_manager.patch_size
    batch_size = trainer.configuration_manager.batch_size
    data = torch.randn((batch_size, trainer.num_input_channels, *patch), generator=generator)
    full = (torch.rand((batch_size, 1, *patch), generator=generator) > 0.9).float()
    target = [torch.nn.functional.interpolate(full, size=[int(round(p * s)) for p, s in zip(patch, scale)],
                                              mode="nearest")
              for scale in trainer._get_deep_supervision_scales()]
    return {"data": data, "target": target}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    from calibnet.launch.training_run import prepare_trainer
    from calibnet.runs import RunSpec
    from common import step_times, temporary_benchmark_dataset

    results = {}
    with temporary_benchmark_dataset(args.shape, cases_per_center=2) as (roots, _):
        batch = None
        for method in ("nnunet", "calunet"):
            trainer, *_ = prepare_trainer(RunSpec(501, "3d_fullres", method, 0), roots.preprocessed, roots.results,
                                          args.device)
            trainer.initialize()
            trainer.fip_estimator = "exact"  # every step's FIP (calunet's default amortises: fip_estimator.py)
            trainer.step_in_epoch = 0
            batch = batch or _batch(trainer)
            times = step_times(lambda t=trainer, b=batch: t.train_step(b), args.steps, args.device)
            results[method] = {"median_step_seconds": round(statistics.median(times), 4),
                               "min_step_seconds": round(min(times), 4)}
            patch = list(trainer.configuration_manager.patch_size)
            batch_size = trainer.configuration_manager.batch_size
    print(json.dumps({
        "benchmark": "train_step", "device": args.device, "machine": platform.machine(), "threads": torch.get_num_threads(),
        "patch_size": patch, "batch_size": batch_size, "steps": args.steps, **results,
        "calunet_over_nnunet": round(results["calunet"]["median_step_seconds"]
                                     / results["nnunet"]["median_step_seconds"], 3),
    }))


if __name__ == "__main__":
    main()
