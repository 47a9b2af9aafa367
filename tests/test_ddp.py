"""calib_train --num-gpus N: the refusals (before anything is written), the single-process path unchanged, and
the spawn path with nnU-Net's DDP pieces replaced by fakes (no GPU, no NCCL: ranks run one after the other in
this process)."""
import json
import os

import pytest
import torch

from calibnet import api
from calibnet.cli import train as train_cli
from calibnet.launch import ddp, train_and_predict, training_run
from calibnet.paths import setup_data_roots
from calibnet.runs import RUN_FILENAME, Run, RunSpec
from conftest import run_cli, use_data_dir

DATASET = 777


@pytest.fixture
def fake_dataset(tmp_path):
    """A CALIBNET_DATA whose preprocessed dataset 777 has just what checking a request reads (plans, splits)."""
    use_data_dir(tmp_path / "data")
    roots = setup_data_roots()
    folder = roots.preprocessed / f"Dataset{DATASET}_Fake"
    folder.mkdir(parents=True)
    (folder / "CalibPlans.json").write_text(json.dumps({"configurations": {"3d_fullres": {"batch_size": 2}}}))
    (folder / "CalibPlans_3d_fullres").mkdir()
    fold = {"fold": 0, "held_out": {"center": "C1"}, "train": ["a"], "val": ["b"], "test": ["c"]}
    (folder / "calib_splits.json").write_text(json.dumps({"loco": {"folds": [fold]}}))
    return roots


def _gpus(monkeypatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def _written(roots) -> list:
    return sorted(p.relative_to(roots.results) for p in roots.results.rglob("*"))


@pytest.mark.parametrize("gpus, args, status, message", [
    (0, ["nnunet", 0, "--num-gpus", 2], 1, "--num-gpus 2 needs 2 CUDA devices; torch sees 0 here."),
    (1, ["nnunet", 0, "--num-gpus", 2], 1, "--num-gpus 2 needs 2 CUDA devices; torch sees 1 here."),
    (2, ["nnunet", 0, "--num-gpus", 2, "--device", "cpu"], 2, "not with --device cpu"),
    (2, ["nnunet", 0, "--num-gpus", 2, "--predict-only"], 2, "--predict-only predicts on one device"),
    (2, ["calunet", 0, "--num-gpus", 2], 1, "does not work with torch.autograd.grad"),
    (2, ["unet_fip", 0, "--num-gpus", 2], 1, "unet_fip does not train on several GPUs: FIP takes"),
    (2, ["samft", 0, "--num-gpus", 2], 1, "builds the SAM network in its own initialize()"),
    (2, ["vanilla_sam", 0, "--num-gpus", 2], 1, "vanilla_sam does not train on several GPUs: it has nothing to train"),
    (2, ["confidence_head", 0, "--base", "nnunet", "--num-gpus", 2], 1, "outside nnU-Net's DDP wrapper"),
    (3, ["nnunet", 0, "--num-gpus", 3], 1, "nnU-Net splits the batch of 2 patches of 3d_fullres in"),
])
def test_num_gpus_refusals_say_what_to_do_and_write_nothing(fake_dataset, monkeypatch, gpus, args, status, message):
    _gpus(monkeypatch, gpus)
    monkeypatch.setattr(ddp.mp, "spawn", lambda *a, **k: pytest.fail("spawned"))
    result = run_cli(train_cli.main, [DATASET, "3d_fullres", *args], expect_ok=False)
    assert result.exit_code == status and message in result.output and "Traceback" not in result.output
    error = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(error) == 1, result.output
    if args[0] != "nnunet":  # a method refused: the message lists those that train on several GPUs
        assert "Train it with --num-gpus 1; methods that train with nnU-Net's DDP: nnunet, unet_cmp, focal" in error[0]
    assert _written(fake_dataset) == []


def test_calib_experiment_takes_num_gpus_from_calib_train_and_checks_it(fake_dataset):
    from calibnet.cli.experiment import train_parser
    from calibnet.errors import CalibnetError
    from calibnet.launch.request_checks import check_request

    parser = train_parser()
    assert "num-gpus" in parser.flags and not parser.flags["num-gpus"].is_flag
    request = parser.parse([str(DATASET), "3d_fullres", "focal", "0", "--num-gpus", "2"])
    assert request.num_gpus == 2
    assert check_request(request, fake_dataset.preprocessed) == "focal"  # GPUs are counted where a cell runs
    with pytest.raises(CalibnetError, match="calsam does not train on several GPUs"):
        check_request(parser.parse([str(DATASET), "3d_fullres", "calsam", "0", "--num-gpus", "2"]),
                      fake_dataset.preprocessed)


def _fake_prediction(monkeypatch, calls):
    def predict(folder, raw, preprocessed, device, **_):
        calls.append(("predict", device))
        return {"val": folder / "predictions" / "val", "test": folder / "predictions" / "test"}
    monkeypatch.setattr(train_and_predict, "predict_run_splits", predict)


def _record(job, rank):
    folder = training_run.locate_run(job.spec, job.preprocessed_root, job.results_root)
    folder.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        (folder / RUN_FILENAME).write_text(json.dumps({"spec": {}, "num_gpus": job.num_gpus}))
    return folder


def test_num_gpus_1_trains_in_this_process_as_before(fake_dataset, monkeypatch):
    calls = []
    monkeypatch.delenv("MASTER_PORT", raising=False)
    monkeypatch.setattr(ddp.mp, "spawn", lambda *a, **k: pytest.fail("spawned"))
    monkeypatch.setattr(training_run, "run_job",
                        lambda job, log=print, rank=0: calls.append(("train", job.device, job.num_gpus, rank))
                        or _record(job, rank))
    _fake_prediction(monkeypatch, calls)
    result = api.train(api.TrainRequest(DATASET, "3d_fullres", "nnunet", 0, device="cpu"), fake_dataset,
                       log=lambda line: None)
    assert calls == [("train", "cpu", 1, 0), ("predict", "cpu")]
    assert result.trained and "MASTER_PORT" not in os.environ


@pytest.mark.parametrize("port", [None, "29517"])
def test_num_gpus_spawns_one_rank_per_gpu_then_predicts_on_one(fake_dataset, monkeypatch, port):
    _gpus(monkeypatch, 2)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    if port is None:
        monkeypatch.delenv("MASTER_PORT", raising=False)
        monkeypatch.setattr(ddp, "find_free_network_port", lambda: 40123)
    else:
        monkeypatch.setenv("MASTER_PORT", port)
    calls = []

    def spawn(function, args, nprocs, join):
        calls.append(("spawn", nprocs, join))
        for rank in range(nprocs):  # what mp.spawn does in N processes, one after the other here
            function(rank, *args)

    def train_rank(job, log=print, rank=0):
        calls.append(("train", rank, job.device, job.num_gpus, os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]))
        return _record(job, rank)

    monkeypatch.setattr(ddp.mp, "spawn", spawn)
    monkeypatch.setattr(ddp, "setup_ddp", lambda rank, world_size: calls.append(("setup", rank, world_size)))
    monkeypatch.setattr(ddp, "cleanup_ddp", lambda: calls.append(("cleanup",)))
    monkeypatch.setattr(ddp.torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    monkeypatch.setattr(ddp, "run_job", train_rank)
    monkeypatch.setattr(training_run, "run_job", lambda *a, **k: pytest.fail("trained in the calling process"))
    _fake_prediction(monkeypatch, calls)
    lines = []
    result = api.train(api.TrainRequest(DATASET, "3d_fullres", "guided_nnunet", 0, epochs=3, num_gpus=2),
                       fake_dataset, log=lines.append)
    used = port or "40123"
    assert calls == [("spawn", 2, True),
                     ("setup", 0, 2), ("set_device", 0), ("train", 0, "cuda:0", 2, "localhost", used), ("cleanup",),
                     ("setup", 1, 2), ("set_device", 1), ("train", 1, "cuda:1", 2, "localhost", used), ("cleanup",),
                     ("predict", "cuda")]
    assert f"training on 2 GPUs with nnU-Net's DDP (localhost:{used})" in lines
    assert os.environ.get("MASTER_PORT") == port and "MASTER_ADDR" not in os.environ  # as before the training
    record = json.loads((result.folder / RUN_FILENAME).read_text())
    assert record["num_gpus"] == 2 and record["seconds"]["training"] >= 0


def test_a_rank_that_fails_cleans_up_and_a_calibnet_error_reads_as_one_line(fake_dataset, monkeypatch):
    from calibnet.errors import CalibnetError

    calls = []
    monkeypatch.setattr(ddp, "setup_ddp", lambda rank, world_size: calls.append("setup"))
    monkeypatch.setattr(ddp, "cleanup_ddp", lambda: calls.append("cleanup"))
    monkeypatch.setattr(ddp.torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(ddp, "run_job", lambda *a, **k: (_ for _ in ()).throw(CalibnetError("loss is not finite")))
    with pytest.raises(CalibnetError):
        ddp.train_rank(1, training_run.TrainingJob(RunSpec(DATASET, "3d_fullres", "nnunet", 0),
                                                   fake_dataset.preprocessed, fake_dataset.results, num_gpus=2), 2)
    assert calls == ["setup", "cleanup"]
    traceback_text = ("\n\n-- Process 1 terminated with the following error:\nTraceback (most recent call last):\n"
                      '  File "x.py", line 1, in f\n'
                      "calibnet.trainers.nnUNetTrainerCalib.NonFiniteLossError: training stopped: the total loss is "
                      "not finite at epoch 3, step 7 (RUN); lower the learning rate\n")
    assert ddp._calibnet_error(traceback_text) == ("training stopped: the total loss is not finite at epoch 3, step 7 "
                                                   "(RUN); lower the learning rate")
    assert ddp._calibnet_error("Traceback ...\nRuntimeError: NCCL error\n") is None


def test_older_records_read_as_one_gpu(tmp_path):
    assert Run(tmp_path, {"spec": {"method": "nnunet"}}).num_gpus == 1
    assert Run(tmp_path, {"spec": {"method": "nnunet"}, "num_gpus": 4}).num_gpus == 4


def _dicepp_batch(seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, 3, 6, 5, 4, generator=generator, requires_grad=True)
    target = torch.randint(0, 3, (4, 1, 6, 5, 4), generator=generator).float()
    return logits, target


def test_dicepp_on_several_gpus_is_the_loss_of_the_whole_batch_not_of_each_part():
    """Each GPU holds part of nnU-Net's batch; Dice++ pools its sums over the parts, as nnU-Net's batch Dice."""
    from calibnet.losses import dice_plus_plus_loss, dice_plus_plus_sums

    logits, target = _dicepp_batch()
    whole = dice_plus_plus_loss(logits, target, gamma=2)
    (expected,) = torch.autograd.grad(whole, logits)
    other = [s.detach() for s in dice_plus_plus_sums(logits[2:], target[2:], gamma=2)]  # the other rank's part
    sums = iter(other)
    part = dice_plus_plus_loss(logits[:2], target[:2], gamma=2, pool=lambda value: value + next(sums))
    assert part.item() == pytest.approx(whole.item(), rel=1e-6)
    assert dice_plus_plus_loss(logits[:2], target[:2], gamma=2).item() != pytest.approx(whole.item(), rel=1e-3)
    (gradient,) = torch.autograd.grad(part, logits)
    torch.testing.assert_close(gradient[:2], expected[:2])


def test_dicepp_trainer_loss_pools_over_ranks_with_nnunets_all_gather(tmp_path):
    """With a process group (gloo, one rank, CPU) the trainer's Dice++ goes through nnU-Net's AllGatherGrad and
    gives the loss and gradients of one process."""
    import torch.distributed as dist
    from calibnet.trainers.nnUNetTrainerCalibrationLosses import DicePlusPlusLoss

    logits, target = _dicepp_batch(1)
    plain = DicePlusPlusLoss(2.0, regions=False)(logits, target)
    (expected,) = torch.autograd.grad(plain, logits)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        pooled = DicePlusPlusLoss(2.0, regions=False, ddp=True)(logits, target)
        (gradient,) = torch.autograd.grad(pooled, logits)
    finally:
        dist.destroy_process_group()
    assert pooled.item() == pytest.approx(plain.item(), rel=1e-6)
    torch.testing.assert_close(gradient, expected)
