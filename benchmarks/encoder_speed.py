"""Slices per second of the frozen LiteMedSAM encoder: the old float32 path and each candidate; prints JSON.

    nice -n 19 python benchmarks/encoder_speed.py [--slices 8] [--repeats 3] [--compile]

Every candidate encodes the same ``--slices`` prepared 256² inputs (phantom slices of 96² through the
backbone's own preprocessing) and is compared with the old path's float32 embeddings: ``max_rel_error`` =
max |Δ| / max |reference|, ``mean_rel_error`` = mean |Δ| / max |reference| (the bar is 1e-3). Candidates are
timed interleaved, one round after another, so a change of the machine's load hits all of them alike;
reported: slices/s and CPU seconds per slice (process time, less sensitive to a shared machine's load),
medians over ``--repeats`` rounds after one untimed warm-up round, and the load average before and after.
bfloat16 autocast is checked for accuracy only. ``--compile`` adds torch.compile of the chosen encoder: its
first call (the compilation) is timed apart, then it joins the rounds; where it cannot compile (no C++
compiler) the JSON says why. Batch sizes up to ``--slices`` (1, 2, 4, 8) are compared.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

import torch


def phantom_slices(count: int, size: int = 96) -> torch.Tensor:
    """(count, 1, size, size) smooth images with a bright ellipse and noise, a different one per slice."""
    generator = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images = []
    for _ in range(count):
        cy, cx, ry, rx = (torch.rand(4, generator=generator) * torch.tensor([40, 40, 15, 15]) + torch.tensor(
            [28, 28, 6, 6])).tolist()
        blob = (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1).float()
        images.append(2 * blob + 0.3 * torch.randn(size, size, generator=generator) + xx / size)
    return torch.stack(images)[:, None]


def errors(embeddings: torch.Tensor, reference: torch.Tensor) -> dict:
    scale = reference.abs().max().item()
    delta = (embeddings.float() - reference).abs()
    return {"max_rel_error": float(f"{delta.max().item() / scale:.3g}"),
            "mean_rel_error": float(f"{delta.mean().item() / scale:.3g}")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="add the torch.compile candidate (compiles first)")
    args = parser.parse_args()

    from calibnet.networks.fast_encoder import inference_encoder
    from calibnet.networks.sam_backbone import SamSliceSegmenter, build_sam, packaged_litemedsam

    config = packaged_litemedsam()
    network = SamSliceSegmenter(build_sam(config), unit_intensities=True, image_channel=0)
    inputs = network.slices_to_sam_input(network.slice_images(phantom_slices(args.slices).transpose(0, 1)))
    encoder = network.image_encoder
    fused = inference_encoder(encoder)  # what calibnet encodes with: BatchNorm folded, channels-last
    fused_nchw_encoder = inference_encoder(encoder).to(memory_format=torch.contiguous_format)
    channels_last = copy.deepcopy(encoder).eval().to(memory_format=torch.channels_last)
    threads = torch.get_num_threads()

    def batched(function, batch):
        def run():
            return torch.cat([function(inputs[start:start + batch]) for start in range(0, len(inputs), batch)])
        return run

    def old(x):  # the path before: no_grad, float32, NCHW, unfused
        with torch.no_grad():
            return encoder(x)

    def inference_mode(x):
        with torch.inference_mode():
            return encoder(x).clone()

    def one_thread(function):
        def run(x):
            torch.set_num_threads(1)
            try:
                return function(x)
            finally:
                torch.set_num_threads(threads)
        return run

    def bf16(x):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return encoder(x).float()

    def cl_only(x):
        with torch.no_grad():
            return channels_last(x.contiguous(memory_format=torch.channels_last)).contiguous()

    def fused_nchw(x):
        with torch.no_grad():
            return fused_nchw_encoder(x)

    def fused_cl(x):  # the whole batch in one call (encode_fast itself encodes one slice per call)
        with torch.no_grad():
            return fused(x.contiguous(memory_format=torch.channels_last)).contiguous()

    largest = max(b for b in (1, 2, 4, 8) if b <= args.slices)
    candidates = {f"old_batch{largest}": batched(old, largest), "old_batch1": batched(old, 1),
                  f"inference_mode_batch{largest}": batched(inference_mode, largest),
                  f"channels_last_batch{largest}": batched(cl_only, largest),
                  f"fused_bn_batch{largest}": batched(fused_nchw, largest)}
    for batch in (b for b in (1, 2, 4, 8) if b <= args.slices):
        candidates[f"fused_bn_channels_last_batch{batch}"] = batched(fused_cl, batch)
    candidates[f"fused_bn_channels_last_batch{largest}_1_thread_of_{threads}"] = batched(one_thread(fused_cl), largest)
    result = {"machine": f"{os.cpu_count()} CPUs, torch {torch.__version__}, {threads} intra-op threads",
              "slices": args.slices, "repeats": args.repeats, "load_average_before": os.getloadavg(),
              "candidates": {}}
    reference = old(inputs)
    outputs = {name: run() for name, run in candidates.items()}  # warm-up round (and the embeddings compared)
    print("warm-up round done", file=sys.stderr, flush=True)
    outputs[f"bfloat16_autocast_batch{largest}"] = batched(bf16, largest)()
    if args.compile:
        try:
            compiled = torch.compile(fused)
            start = time.perf_counter()
            with torch.no_grad():
                outputs[f"compiled_fused_bn_channels_last_batch{largest}"] = batched(
                    lambda x: compiled(x.contiguous(memory_format=torch.channels_last)).contiguous(), largest)()
            result["compile_seconds_first_call"] = round(time.perf_counter() - start, 1)
            candidates[f"compiled_fused_bn_channels_last_batch{largest}"] = batched(
                lambda x: compiled(x.contiguous(memory_format=torch.channels_last)).contiguous(), largest)
        except Exception as e:  # no C++ compiler, unsupported platform: reported, not fatal
            result["compile_unavailable"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    seconds = {name: [] for name in candidates}
    cpu_seconds = {name: [] for name in candidates}
    for round_index in range(args.repeats):
        for name, run in candidates.items():
            start, cpu_start = time.perf_counter(), time.process_time()
            with torch.no_grad():
                run()
            seconds[name].append(time.perf_counter() - start)
            cpu_seconds[name].append(time.process_time() - cpu_start)
        print(f"round {round_index + 1}/{args.repeats} done", file=sys.stderr, flush=True)
    result["load_average_after"] = os.getloadavg()
    for name, embeddings in outputs.items():
        entry = errors(embeddings, reference)
        if name in seconds:
            entry["slices_per_second"] = round(args.slices / statistics.median(seconds[name]), 3)
            entry["cpu_seconds_per_slice"] = round(statistics.median(cpu_seconds[name]) / args.slices, 3)
        result["candidates"][name] = entry
    old_speed = result["candidates"][f"old_batch{largest}"]["slices_per_second"]
    eligible = {name: entry for name, entry in result["candidates"].items()
                if "slices_per_second" in entry and entry["max_rel_error"] <= 1e-3 and "compiled" not in name}
    chosen = max(eligible, key=lambda name: eligible[name]["slices_per_second"])
    result["fastest_eligible_eager"] = chosen
    result[f"speedup_vs_old_batch{largest}"] = round(eligible[chosen]["slices_per_second"] / old_speed, 2)
    result["chosen_configuration"] = "calibnet.networks.fast_encoder: BatchNorm folded, channels-last, no_grad, " \
                                     f"float32, {threads} threads, one slice per call"
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
