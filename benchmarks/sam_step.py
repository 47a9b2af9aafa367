"""Time SAM training steps; prints JSON.

    python benchmarks/sam_step.py [--shape 64] [--steps 10] [--device cpu] [--sam-model litemedsam|tiny|vit_b ...]
                                  [--sam-checkpoint PATH]

On the synthetic benchmark (built in a temporary CALIBNET_DATA) and one fixed batch of slices, with the
default backbone (LiteMedSAM) unless told otherwise:
- the frozen encoder's seconds per slice;
- the decoder step of samft vs calsam (the FIP + CMP overhead; the CalSAM paper reports about +15 %);
- each of those steps with the batch's slices decoded in one decoder call (the default) vs one call per slice
  (``decode_chunk = 1``, the loop decoding was before), and the same for decoding one case's prompted slices
  at prediction (embeddings cached, so the encoder is not timed);
- a samft step with the embedding cache vs with the frozen encoder recomputed every step;
- what the store's float16 does to the decoder's logits (max |Δ| and the share of pixels whose mask flips).
Medians over ``--steps`` steps after two warm-up steps.
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch


def _median_step(trainer, batch, steps: int, device: str, clear_cache: bool = False,
                 decode_chunk: int | None = None) -> float:
    """Median seconds of a training step; ``decode_chunk=1`` decodes the batch slice by slice."""
    from common import step_times

    def step():
        if clear_cache:
            trainer.embedding_cache.clear()
        trainer.calib_train_step(batch)

    store, chunk = trainer.network.embedding_store, trainer.network.decode_chunk
    if clear_cache:
        trainer.network.embedding_store = None  # the encoder itself, every step
    trainer.network.decode_chunk = decode_chunk or chunk
    try:
        return statistics.median(step_times(step, steps, device))
    finally:
        trainer.network.embedding_store, trainer.network.decode_chunk = store, chunk


def _case_decode(trainer, steps: int, device: str) -> dict:
    """Seconds to decode every slice of one case with its own prompts, as prediction does (the prompted slices'
    embeddings come from the cache filled before training), batched vs slice by slice."""
    import numpy as np
    from common import step_times

    from calibnet.prompts import sam_slice_prompts

    network = trainer.network
    case_id = sorted(trainer.volumes)[0]
    foreground = trainer.volumes[case_id][1]
    prompts = sam_slice_prompts(foreground, np.random.default_rng(0), trainer.box_prompts)
    prompted = [z for z, prompt in enumerate(prompts) if prompt is not None]
    embeddings = [None] * len(prompts)
    for z, embedding in zip(prompted, trainer.embeddings([(case_id, z) for z in prompted])):
        embeddings[z] = embedding

    def decode():
        with torch.no_grad():
            network.decode(embeddings, prompts, tuple(foreground.shape[1:]))

    chunk = network.decode_chunk
    seconds = {}
    try:
        for name, decode_chunk in (("case_decode_seconds", chunk), ("case_decode_loop_seconds", 1)):
            network.decode_chunk = decode_chunk
            seconds[name] = round(statistics.median(step_times(decode, steps, device)), 4)
    finally:
        network.decode_chunk = chunk
    return {"case_slices": len(prompts), "case_prompted_slices": len(prompted), **seconds,
            "case_decode_loop_over_batched": round(seconds["case_decode_loop_seconds"]
                                                   / seconds["case_decode_seconds"], 3)}


def _encoder_and_float16(trainer, batch) -> dict:
    """Encoder seconds per slice on the batch's slices, and the float16 store's effect on their logits."""
    import time

    network = trainer.network
    keys = batch["keys"]
    slices = [network.slice_images(trainer.volumes[c][0][:, z:z + 1].to(trainer.device)) for c, z in keys]
    prompts = trainer.slice_prompts(keys)
    with torch.no_grad():
        inputs = torch.cat([network.slices_to_sam_input(s) for s in slices])  # every slice at S×S
        start = time.perf_counter()
        exact = network.encode(inputs)
        seconds = (time.perf_counter() - start) / len(keys)
        changes, flipped = [], []
        for embedding, prompt, slice_ in zip(exact, prompts, slices):
            shape = tuple(slice_.shape[-2:])
            full = network.decode(embedding[None], [prompt], shape)
            half = network.decode(embedding[None].half().float(), [prompt], shape)
            changes.append(float((full - half).abs().max()))
            flipped.append(float(((full > 0) != (half > 0)).float().mean()))
    return {"encoder_seconds_per_slice": round(seconds, 3),
            "float16_max_abs_logit_change": max(changes),
            "float16_mask_pixels_flipped": sum(flipped) / len(flipped)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sam-model", default=None, help="default: litemedsam (the packaged LiteMedSAM)")
    parser.add_argument("--sam-checkpoint", default=None)
    args = parser.parse_args()

    from calibnet.networks.sam_backbone import resolve_sam_config
    from common import sam_trainer, temporary_benchmark_dataset

    config, _ = resolve_sam_config(args.sam_model, args.sam_checkpoint)
    result = {}
    with temporary_benchmark_dataset(args.shape, cases_per_center=2) as (roots, _):
        batch = None
        for method in ("samft", "calsam"):
            trainer, train_batches = sam_trainer(roots, method, config, args.device)
            batch = batch or next(train_batches)
            result[f"{method}_cached_step_seconds"] = round(_median_step(trainer, batch, args.steps, args.device), 4)
            result[f"{method}_loop_step_seconds"] = round(
                _median_step(trainer, batch, args.steps, args.device, decode_chunk=1), 4)
            result[f"{method}_loop_over_batched"] = round(result[f"{method}_loop_step_seconds"]
                                                          / result[f"{method}_cached_step_seconds"], 3)
            if method == "samft":
                result.update(_case_decode(trainer, args.steps, args.device))
                result.update(_encoder_and_float16(trainer, batch))
                result["samft_encoder_every_step_seconds"] = round(
                    _median_step(trainer, batch, args.steps, args.device, clear_cache=True), 4)
    print(json.dumps({
        "benchmark": "sam_step", "device": args.device, "sam": config.describe(), "threads": torch.get_num_threads(),
        "slices_per_batch": len(batch["keys"]), "steps": args.steps, **result,
        "calsam_over_samft": round(result["calsam_cached_step_seconds"] / result["samft_cached_step_seconds"], 3),
        "encoder_every_step_over_cached": round(result["samft_encoder_every_step_seconds"]
                                                / result["samft_cached_step_seconds"], 3),
    }))


if __name__ == "__main__":
    main()
