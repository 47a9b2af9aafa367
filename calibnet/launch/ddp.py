"""Training one run on several GPUs with nnU-Net's own DDP (``calib_train ... --num-gpus N``).

nnU-Net's ``run_ddp`` cannot be called as it is: it finds trainers by name inside nnunetv2 and runs nnU-Net's
own validation afterwards, not calibnet's run folder, split, seed and loss options. So this module follows its
mechanism with nnU-Net's own pieces: ``MASTER_ADDR=localhost`` and ``MASTER_PORT`` (nnU-Net's
``find_free_network_port`` unless set), ``torch.multiprocessing.spawn`` of N ranks, and in each rank nnU-Net's
``setup_ddp`` (NCCL process group), ``torch.cuda.set_device(rank)``, the trainer prepared exactly as a
single-process training prepares it (:func:`calibnet.launch.training_run.run_job`), its training, then
nnU-Net's ``cleanup_ddp``. nnU-Net's trainer does the rest once the process group exists: it splits the batch
size over the ranks, wraps the network in DistributedDataParallel (with SyncBatchNorm) in ``initialize()``,
gathers losses and the online validation's Dice, and saves checkpoints and logs on rank 0 only. Rank 0 also
writes calibnet_run.json; the calling process predicts val and test afterwards, on one GPU.
"""
from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import torch
import torch.multiprocessing as mp
from nnunetv2.run.run_training import cleanup_ddp, find_free_network_port, setup_ddp

from calibnet.errors import CalibnetError
from calibnet.launch.training_run import TrainingJob, find_preprocessed_dataset, locate_run, run_job
from calibnet.runs import CALIB_PLANS_NAME, RUN_FILENAME


def check_cuda_devices(num_gpus: int) -> None:
    """Refuse ``--num-gpus N`` where torch does not see N CUDA devices."""
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if visible < num_gpus:
        raise CalibnetError(f"--num-gpus {num_gpus} needs {num_gpus} CUDA devices; torch sees {visible} here. Run "
                            f"on a machine with {num_gpus} GPUs (CUDA_VISIBLE_DEVICES must list them), or train on "
                            f"one with --num-gpus 1.")


def check_batch_size(job: TrainingJob) -> None:
    """nnU-Net splits the batch of the plans over the GPUs and needs at least one patch per GPU."""
    folder = find_preprocessed_dataset(job.preprocessed_root, job.spec.dataset_id)
    plans = json.loads((folder / f"{CALIB_PLANS_NAME}.json").read_text())
    batch_size = plans["configurations"][job.spec.configuration].get("batch_size")
    if batch_size is not None and batch_size < job.num_gpus:
        raise CalibnetError(f"--num-gpus {job.num_gpus}: nnU-Net splits the batch of {batch_size} patches of "
                            f"{job.spec.configuration} in {folder / (CALIB_PLANS_NAME + '.json')} over the GPUs and "
                            f"needs one patch per GPU at least; use --num-gpus {batch_size} or fewer.")


def train_on_gpus(job: TrainingJob, log=print) -> Path:
    """Train ``job`` with one process per GPU (``job.num_gpus`` of them) and return its run folder."""
    check_batch_size(job)
    saved = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT")}
    os.environ["MASTER_ADDR"] = "localhost"
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(find_free_network_port())
    log(f"training on {job.num_gpus} GPUs with nnU-Net's DDP (localhost:{os.environ['MASTER_PORT']})")
    try:
        mp.spawn(train_rank, args=(job, job.num_gpus), nprocs=job.num_gpus, join=True)
    except mp.ProcessRaisedException as e:
        message = _calibnet_error(str(e))
        if message is None:
            raise
        raise CalibnetError(f"rank {e.error_index} of {job.num_gpus}: {message}") from e
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    folder = job.folder or locate_run(job.spec, job.preprocessed_root, job.results_root)
    if not (folder / RUN_FILENAME).is_file():
        raise CalibnetError(f"the {job.num_gpus} training processes ended without {folder / RUN_FILENAME}; see "
                            f"the training log in {folder}.")
    return folder


def train_rank(rank: int, job: TrainingJob, world_size: int) -> None:
    """One rank (one process, one GPU) of a multi-GPU training."""
    setup_ddp(rank, world_size)
    try:
        torch.cuda.set_device(rank)
        run_job(replace(job, device=f"cuda:{rank}"), rank=rank)
    finally:
        cleanup_ddp()


def _calibnet_error(traceback_text: str) -> str | None:
    """The message of a calibnet error that ended a rank (from the traceback torch passes back), else None."""
    lines = traceback_text.rstrip().splitlines()
    for index in range(len(lines) - 1, -1, -1):
        name, sep, message = lines[index].partition(": ")
        if sep and name.startswith("calibnet.") and name.endswith("Error"):
            return "\n".join([message, *lines[index + 1:]])
    return None
