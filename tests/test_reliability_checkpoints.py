"""No code from a checkpoint: every checkpoint calibnet reads is read with weights_only=True; one whose pickle asks
for anything beyond weights and nnU-Net's numpy scalars is refused with one message, and its payload never runs."""
import ast
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import calibnet
from calibnet.checkpoints import UnsafeCheckpointError, load_checkpoint
from calibnet.cli import predict as predict_cli
from conftest import run_cli

REFUSED = "contains objects calibnet will not unpickle"


class _Payload:
    """Unpickling this creates ``marker``: what a hostile checkpoint would do with os.system."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def _poisoned_copy(run, tmp_path) -> tuple:
    """(results root, run folder) of a copy of ``run`` whose model checkpoints carry a payload, and its marker."""
    results = tmp_path / "results"
    shutil.copytree(run.results, results, ignore=shutil.ignore_patterns("predictions"))
    folder = results / run.folder.relative_to(run.results)
    marker = tmp_path / "payload_ran"
    for path in folder.glob("checkpoint_*.pth"):
        checkpoint = load_checkpoint(path)
        checkpoint["logging"]["payload"] = _Payload(marker)  # nested: found wherever it is
        torch.save(checkpoint, path)
    return results, folder, marker


def test_calib_predict_refuses_a_checkpoint_carrying_code_and_never_runs_it(nnunet_run, tiny_dataset, tmp_path):
    results, folder, marker = _poisoned_copy(nnunet_run, tmp_path)
    nnunet_run.activate()
    os.environ["nnUNet_results"] = str(results)
    incoming, out = tmp_path / "incoming", tmp_path / "out"
    incoming.mkdir()
    for channel in (0, 1):
        shutil.copy(tiny_dataset.raw / "imagesTr" / f"C4_000_{channel:04d}.nii.gz", incoming)
    result = run_cli(predict_cli.main, ["-d", 511, "-m", "nnunet", "-f", 0, "-i", incoming, "-o", out,
                                        "--device", "cpu", "--disable-tta"], expect_ok=False)
    assert result.exit_code == 1, result.output
    assert f"{folder}/checkpoint_final.pth {REFUSED} (exec)" in result.output, result.output
    assert "could run code" in result.output and "Traceback" not in result.output
    assert not marker.exists(), "the checkpoint's payload ran"
    assert not out.exists()


def test_every_checkpoint_reader_refuses_code(nnunet_run, tmp_path, monkeypatch):
    """The readers of nnU-Net checkpoints (resuming a training), confidence heads and SAM weights."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from calibnet.inference.confidence_heads import load_heads
    from calibnet.networks.confidence_head import HEAD_FOLDERS
    from calibnet.networks.sam_backbone import load_sam_state_dict
    from calibnet.trainers.nnUNetTrainerCalib import nnUNetTrainerCalib

    _, folder, marker = _poisoned_copy(nnunet_run, tmp_path)
    read_by_nnunet = []  # what nnU-Net 2.8.1's load_checkpoint does with a file name, without the rest of it
    monkeypatch.setattr(nnUNetTrainer, "load_checkpoint", lambda self, name: read_by_nnunet.append(
        torch.load(name, map_location=self.device, weights_only=False)))
    trainer = nnUNetTrainerCalib.__new__(nnUNetTrainerCalib)  # only its load_checkpoint is called
    trainer.device = torch.device("cpu")
    with pytest.raises(UnsafeCheckpointError, match=REFUSED):
        trainer.load_checkpoint(str(folder / "checkpoint_final.pth"))
    assert read_by_nnunet == [] and "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ
    trainer.load_checkpoint(nnunet_run.folder / "checkpoint_final.pth")
    assert "network_weights" in read_by_nnunet[0]

    head_folder = folder / next(iter(HEAD_FOLDERS))
    head_folder.mkdir()
    torch.save({"head_weights": {}, "head_config": _Payload(marker)}, head_folder / "checkpoint_final.pth")
    with pytest.raises(UnsafeCheckpointError, match=REFUSED):
        load_heads(folder, torch.device("cpu"))
    torch.save({"model": {"image_encoder.x": torch.zeros(1)}, "extra": _Payload(marker)}, tmp_path / "sam.pth")
    with pytest.raises(UnsafeCheckpointError, match=f"sam.pth {REFUSED}"):
        load_sam_state_dict(tmp_path / "sam.pth")
    assert not marker.exists()


def test_only_numpy_scalars_are_allowed_beyond_weights(tmp_path):
    torch.save({"ema": np.float64(0.5), "epoch": np.int64(3), "w": torch.ones(2)}, tmp_path / "scalars.pth")
    assert load_checkpoint(tmp_path / "scalars.pth")["ema"] == 0.5
    torch.save({"array": np.arange(3)}, tmp_path / "array.pth")
    with pytest.raises(UnsafeCheckpointError, match=r"\(numpy\._core\.multiarray\._reconstruct\)"):
        load_checkpoint(tmp_path / "array.pth")


def test_a_checkpoint_trained_by_calibnet_still_loads(nnunet_run):
    from calibnet.inference.model_loading import load_model

    path = nnunet_run.folder / "checkpoint_final.pth"
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(path))  # numpy objects: the allow-list is needed
    model = load_model(nnunet_run.folder, "cpu", use_mirroring=False)
    saved = load_checkpoint(path)["network_weights"]
    assert all(torch.equal(value, saved[key]) for key, value in model.network.state_dict().items())


def _torch_load_calls(package: Path) -> list:
    """(file:line, whether it passes weights_only=True) of every torch.load call in ``package``."""
    calls = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                           for k in node.keywords)
                calls.append((f"{path.relative_to(package)}:{node.lineno}", safe))
    return calls


def test_every_torch_load_in_calibnet_is_weights_only():
    calls = _torch_load_calls(Path(calibnet.__file__).parent)
    assert calls and [where for where, safe in calls if not safe] == []
