"""Seconds per case of ``evaluate_case`` (every per-case metric, reading included) on one core, and of
``calib_evaluate -np 2`` over cases, and of reading the case's files alone (the floor); prints JSON.

    python benchmarks/evaluation_speed.py [--cases 4] [--repeats 3] [--baseline OLD.py]

Writes synthetic cases as calibnet and nnU-Net do (4 int16 image channels and uint8 label and prediction as
compressed .nii.gz through SimpleITK, float32 softmax probabilities with ``np.savez_compressed``) at 128³ and at
the BraTS size 240×240×155: a brain-shaped ROI of ~1.5 M voxels, three nested tumour labels, a prediction that
misses them by a few voxels and probabilities of the prediction smoothed inside the brain's bounding box (nnU-Net
writes background = 1 outside it). ``--baseline``: a file with an older ``evaluate_case`` of the same signature
(e.g. the functions before an optimisation, copied out of the repository), timed the same way.
"""
from __future__ import annotations

import os

for _variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_variable] = "1"

import argparse
import importlib.util
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

SHAPES = {"128^3": (128, 128, 128), "240x240x155": (155, 240, 240)}  # (z, y, x)
LABELS = {"edema": [1], "non_enhancing": [2], "enhancing": [3]}


def _write_image(array: np.ndarray, path: Path) -> None:
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path), useCompression=True)


def write_case(folder: Path, case_id: str, shape: tuple, rng: np.random.Generator) -> dict:
    """Images, label, prediction and probabilities of one synthetic case; returns the evaluate_case paths."""
    grid = np.ogrid[tuple(slice(0, s) for s in shape)]
    scale = np.array(shape) / np.array(SHAPES["240x240x155"])
    centre = np.array(shape) / 2
    brain = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, np.array([60, 85, 70]) * scale)) <= 1
    tumour_centre = centre + rng.uniform(-10, 10, 3) * scale
    distance = np.sqrt(sum(((g - c) / s) ** 2 for g, c, s in zip(grid, tumour_centre, scale)))
    predicted_distance = np.sqrt(sum(((g - c - 2) / s) ** 2 for g, c, s in zip(grid, tumour_centre, scale)))
    label, prediction = np.zeros(shape, np.uint8), np.zeros(shape, np.uint8)
    for value, radius in ((1, 25), (2, 15), (3, 8)):
        label[(distance < radius) & brain] = value
        prediction[(predicted_distance < radius * rng.uniform(0.85, 1.1)) & brain] = value
    prediction[(rng.random(shape) < 2e-5) & brain] = 1  # scattered false positives
    paths = {"images": []}
    for channel in range(4):
        image = (brain * (400 + 100 * channel + rng.normal(0, 40, shape))).astype(np.int16)
        paths["images"].append(folder / f"{case_id}_{channel:04d}.nii.gz")
        _write_image(image, paths["images"][-1])
    paths["label"], paths["prediction"] = folder / f"{case_id}_label.nii.gz", folder / f"{case_id}.nii.gz"
    _write_image(label, paths["label"])
    _write_image(prediction, paths["prediction"])
    box = ndimage.find_objects(brain.astype(np.uint8))[0]
    logits = np.stack([ndimage.gaussian_filter((prediction[box] == c).astype(np.float32), 1.5) for c in range(4)])
    logits = 8 * logits + rng.normal(0, 0.3, logits.shape).astype(np.float32)
    probabilities = np.zeros((4, *shape), np.float32)
    probabilities[0] = 1
    softmax = np.exp(logits - logits.max(0))
    probabilities[(slice(None), *box)] = softmax / softmax.sum(0)
    paths["probabilities"] = folder / f"{case_id}.npz"
    np.savez_compressed(paths["probabilities"], probabilities=probabilities)
    return paths


def load_evaluate_case(path: str | None):
    if path is None:
        from calibnet.evaluation.case_evaluation import evaluate_case
        return evaluate_case
    spec = importlib.util.spec_from_file_location("baseline_evaluation", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module.evaluate_case


def seconds_per_case(evaluate_case, cases: list, targets, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        for paths in cases:
            start = time.perf_counter()
            evaluate_case(paths["prediction"], paths["probabilities"], paths["label"], paths["images"], targets,
                          np.random.default_rng(0))
            times.append(time.perf_counter() - start)
    return round(statistics.median(times), 4)


def reading_seconds_per_case(cases: list, repeats: int) -> float:
    """Seconds per case of reading its files alone (images, label, prediction, the .npz's probabilities): the floor
    under evaluate_case on one core, set by zlib (nnU-Net's np.savez_compressed) and the compressed NIfTI."""
    times = []
    for _ in range(repeats):
        for paths in cases:
            start = time.perf_counter()
            for path in [*paths["images"], paths["label"], paths["prediction"]]:
                sitk.GetArrayViewFromImage(sitk.ReadImage(str(path)))
            with np.load(paths["probabilities"]) as archive:
                archive["probabilities"]
            times.append(time.perf_counter() - start)
    return round(statistics.median(times), 4)


def parallel_seconds_per_case(cases: list, targets, repeats: int, num_processes: int) -> float:
    """Wall seconds per case of evaluate_cases over all cases (the workers started and warmed untimed)."""
    from calibnet.evaluation.case_evaluation import CaseJob, case_pool, evaluate_cases

    jobs = [CaseJob(p["prediction"], p["probabilities"], p["label"], p["images"], targets) for p in cases]
    times = []
    with case_pool(num_processes) as pool:
        for repeat in range(repeats + 1):
            start = time.perf_counter()
            for _result in evaluate_cases(jobs, np.random.default_rng(0), pool):
                pass
            if repeat:
                times.append((time.perf_counter() - start) / len(jobs))
    return round(statistics.median(times), 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline", default=None, help="File with an older evaluate_case to time as well.")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    from calibnet.runs import LabelTargets

    targets = LabelTargets(LABELS, False)
    rng = np.random.default_rng(0)
    result = {"benchmark": "evaluation_speed", "machine": platform.machine(), "cores": os.cpu_count(),
              "load_average_1min": round(os.getloadavg()[0], 2), "cases": args.cases, "repeats": args.repeats,
              "median_seconds_per_case": {}}
    with tempfile.TemporaryDirectory() as folder:
        for name, shape in SHAPES.items():
            cases = [write_case(Path(folder), f"{name}_{i}", shape, rng) for i in range(args.cases)]
            figures = {"one_core": seconds_per_case(load_evaluate_case(None), cases, targets, args.repeats),
                       "reading_only_one_core": reading_seconds_per_case(cases, args.repeats)}
            if args.baseline:
                figures["one_core_before"] = seconds_per_case(load_evaluate_case(args.baseline), cases, targets,
                                                              args.repeats)
            figures["np1"] = parallel_seconds_per_case(cases, targets, args.repeats, 1)
            figures["np2"] = parallel_seconds_per_case(cases, targets, args.repeats, 2)
            result["median_seconds_per_case"][name] = figures
    result["load_average_1min_after"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
