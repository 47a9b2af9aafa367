"""What the benchmark scripts share: the synthetic benchmark converted and planned in a temporary folder."""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time


def timed(function, device: str) -> float:
    """Seconds ``function()`` takes, with CUDA work finished before and after on a GPU."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    function()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def step_times(step, steps: int, device: str, warmup: int = 2) -> list:
    """Seconds of ``steps`` calls of ``step()`` after ``warmup`` untimed ones."""
    times = [timed(step, device) for _ in range(steps + warmup)]
    return times[warmup:]


@contextlib.contextmanager
def temporary_benchmark_dataset(shape: int, cases_per_center: int, configurations=("3d_fullres",),
                                num_processes: int = 2):
    """Yield (roots, planning result) for Dataset501 built in a temporary CALIBNET_DATA; nnU-Net's own
    printing goes to stderr so that stdout carries only the benchmark's JSON."""
    from calibnet.dataset_conversion.synthetic import SyntheticConfig, convert_synthetic
    from calibnet.paths import setup_data_roots
    from calibnet.planners.plan_and_preprocess import plan_and_preprocess

    with tempfile.TemporaryDirectory() as data_dir, contextlib.redirect_stdout(sys.stderr):
        for variable in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
            os.environ.pop(variable, None)
        os.environ["CALIBNET_DATA"] = data_dir
        roots = setup_data_roots()
        convert_synthetic(SyntheticConfig(dataset_id=501, shape=(shape,) * 3, cases_per_center=cases_per_center),
                          roots.raw, num_processes=num_processes, progress=False)
        result = plan_and_preprocess(501, roots.raw, roots.preprocessed, configurations=configurations,
                                     num_processes=num_processes, log=lambda _: None)
        yield roots, result


def sam_trainer(roots, method: str, config, device: str):
    """An initialised SAM trainer of ``method`` on the benchmark dataset (3d_fullres, fold 0) with the backbone
    ``config``, and its endless training batches (every slice encoded, as calib_train does before step one)."""
    from dataclasses import replace

    from calibnet.launch.training_run import prepare_trainer
    from calibnet.networks.sam_backbone import sam_image_channel
    from calibnet.runs import RunSpec

    trainer, *_ = prepare_trainer(RunSpec(501, "3d_fullres", method, 0), roots.preprocessed, roots.results, device)
    trainer.sam_config = replace(config, image_channel=sam_image_channel(
        config, trainer.dataset_json["channel_names"], trainer.unit_intensities(config)))
    trainer.initialize()
    trainer.step_in_epoch = 0
    train_batches, _ = trainer.get_dataloaders()
    return trainer, train_batches
