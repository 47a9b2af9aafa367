"""Seconds per case of the confidence scores (the confidence-prediction paper's Table 1 on this machine);
prints JSON.

    python benchmarks/confidence_timing.py [--shape 64] [--repeats 3] [--device cpu]

Builds the synthetic benchmark in a temporary CALIBNET_DATA, trains nnunet_dropout and a confidence head
for a few steps (the weights do not change the cost), then times, per preprocessed case and without
mirroring: the segmentation forward alone; segmentation + confidence head (the head reads the features of
that same forward); and MC-dropout score agreement with N = 2 and N = 15 samples (N forwards, then the
pairwise Dice and NSD of all N·(N−1)/2 pairs and the mean entropy).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    from calibnet.inference.cases import prepare_case, raw_case_inputs
    from calibnet.inference.model_loading import load_model
    from calibnet.inference.scores import head_scores, mc_dropout_scores
    from calibnet.planners.splits import get_fold, load_calib_splits
    from calibnet.launch.training_run import HeadOptions, train, train_confidence_head
    from calibnet.runs import RunSpec
    from common import temporary_benchmark_dataset, timed

    with temporary_benchmark_dataset(args.shape, cases_per_center=2) as (roots, _):
        spec = RunSpec(501, "3d_fullres", "nnunet_dropout", 0, "scanner")
        base = train(spec, roots.preprocessed, roots.results, epochs=1, iterations_per_epoch=2, device=args.device,
                     num_workers=0, log=lambda _: None)
        train_confidence_head(RunSpec(501, "3d_fullres", "confidence_head", 0, "scanner"),
                              HeadOptions("nnunet_dropout", adversarial=False), roots.preprocessed, roots.results,
                              epochs=1, iterations_per_epoch=2, device=args.device, num_workers=0, log=lambda _: None)
        plain = load_model(base, args.device, use_mirroring=False, with_heads=False)
        with_head = load_model(base, args.device, use_mirroring=False)
        dataset = base.parent.parent.name
        fold = get_fold(load_calib_splits(roots.preprocessed / dataset), "scanner", 0)
        cases = raw_case_inputs(roots.raw / dataset, fold["val"] + fold["test"], plain.dataset_json)
        inputs = [prepare_case(plain, case, 0).data for case in cases]
        channels = len(cases[0].images)
        timings = {"segmentation": [], "segmentation_and_head": [], "score_agreement_N2": [],
                   "score_agreement_N15": []}
        for _ in range(args.repeats):
            for data in inputs:
                timings["segmentation"].append(timed(
                    lambda d=data: plain.predictor.predict_logits_from_preprocessed_data(d), args.device))
                timings["segmentation_and_head"].append(timed(
                    lambda d=data: (with_head.predictor.predict_logits_from_preprocessed_data(d),
                                    head_scores(with_head)), args.device))
                for n in (2, 15):
                    timings[f"score_agreement_N{n}"].append(timed(
                        lambda d=data, n=n: mc_dropout_scores(plain, d, [n], channels), args.device))
        shape = list(inputs[0].shape[1:])
    seconds = {name: round(statistics.median(values), 4) for name, values in timings.items()}
    print(json.dumps({
        "benchmark": "confidence_timing", "device": args.device, "machine": platform.machine(),
        "threads": torch.get_num_threads(), "case_shape": shape, "cases": len(inputs), "repeats": args.repeats,
        "median_seconds_per_case": seconds,
        "head_overhead_percent": round(100 * (seconds["segmentation_and_head"] / seconds["segmentation"] - 1), 1),
        "agreement_N15_over_segmentation_and_head": round(seconds["score_agreement_N15"]
                                                          / seconds["segmentation_and_head"], 1),
    }))


if __name__ == "__main__":
    main()
