"""Inference time of the SafeClick decoder vs SAM 2's plain decoder; prints JSON.

    python benchmarks/safeclick_overhead.py [--sam2-model hiera_t] [--sam2-checkpoint PATH]
                                            [--sam2-image-size 256] [--slices 8] [--repeats 5] [--device cpu]

Both models are built from the same SAM 2 (random weights unless a checkpoint is given; timing does not
depend on the weights) and decode the same slices with one box prompt each: 96² random slices, resized to
the encoder size like every slice calibnet predicts. Reported per slice (medians over ``--repeats``
after two warm-up runs): the decoder alone on cached embeddings, and encoder + decoder (what a new slice
costs; the SafeClick paper reports +18 % inference time for the whole model). The SafeClick model's encoder
also returns the middle Hiera block's output that E1 reads.
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch


def _seconds_per_slice(function, slices: int, repeats: int, device: str) -> float:
    from common import step_times

    return statistics.median(step_times(function, repeats, device)) / slices


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sam2-model", default=None)
    parser.add_argument("--sam2-checkpoint", default=None)
    parser.add_argument("--sam2-image-size", type=int, default=256)
    parser.add_argument("--slices", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    from calibnet.networks.safeclick import SafeClickSegmenter
    from calibnet.networks.sam2_backbone import Sam2SliceSegmenter, build_sam2_model, resolve_sam2_config

    config, _ = resolve_sam2_config(args.sam2_model, args.sam2_checkpoint, args.sam2_image_size)
    slices = torch.randn(args.slices, 3, 96, 96, generator=torch.Generator().manual_seed(0)).to(args.device)
    prompts = [{"box": (20.0, 24.0, 70.0, 66.0)}] * args.slices
    result = {}
    for name, segmenter in (("sam2", Sam2SliceSegmenter(build_sam2_model(config))),
                            ("safeclick", SafeClickSegmenter(build_sam2_model(config)))):
        segmenter = segmenter.to(args.device).eval()
        embeddings = segmenter.embed(slices)

        @torch.no_grad()
        def decode(segmenter=segmenter, embeddings=embeddings):
            segmenter.decode(embeddings, prompts, (96, 96))

        @torch.no_grad()
        def encode_and_decode(segmenter=segmenter):
            segmenter.decode(segmenter.embed(slices), prompts, (96, 96))

        result[f"{name}_decoder_seconds_per_slice"] = round(
            _seconds_per_slice(decode, args.slices, args.repeats, args.device), 5)
        result[f"{name}_total_seconds_per_slice"] = round(
            _seconds_per_slice(encode_and_decode, args.slices, args.repeats, args.device), 5)
        if name == "safeclick":
            result["safeclick_plugin_parameters"] = sum(p.numel() for p in segmenter.plugin_parameters())
        result[f"{name}_decoder_parameters"] = sum(p.numel() for p in segmenter.mask_decoder.parameters())

    def overhead(kind: str) -> float:
        return round(100 * (result[f"safeclick_{kind}_seconds_per_slice"] / result[f"sam2_{kind}_seconds_per_slice"]
                            - 1), 1)

    print(json.dumps({"benchmark": "safeclick_overhead", "device": args.device, "sam2": config.describe(),
                      "threads": torch.get_num_threads(), "slices": args.slices, "repeats": args.repeats, **result,
                      "decoder_overhead_percent": overhead("decoder"), "total_overhead_percent": overhead("total")}))


if __name__ == "__main__":
    main()
