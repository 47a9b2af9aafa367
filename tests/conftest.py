"""Shared fixtures: an isolated environment per test and one tiny synthetic dataset per session,
converted and preprocessed through the real command-line entry points."""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

ROOT_VARIABLES = ("CALIBNET_DATA", "nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer")
TINY_ID = 511
TINY_NAME = "Tiny"


class _EnvSnapshot:
    """Restores the data-root variables, which calibnet sets in os.environ on purpose."""

    def __init__(self):
        self.saved = {v: os.environ.get(v) for v in ROOT_VARIABLES}

    def clear(self):
        for v in ROOT_VARIABLES:
            os.environ.pop(v, None)

    def restore(self):
        for v, value in self.saved.items():
            if value is None:
                os.environ.pop(v, None)
            else:
                os.environ[v] = value


@pytest.fixture(autouse=True)
def isolated_roots():
    snapshot = _EnvSnapshot()
    snapshot.clear()
    yield
    snapshot.restore()


def use_data_dir(path) -> None:
    """Point CALIBNET_DATA at ``path``, dropping nnU-Net roots that an earlier command derived from another."""
    for variable in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.environ.pop(variable, None)
    os.environ["CALIBNET_DATA"] = str(path)


def run_cli(command, args, expect_ok=True):
    result = CliRunner().invoke(command, [str(a) for a in args], catch_exceptions=False)
    if expect_ok:
        assert result.exit_code == 0, result.output
    return result


@dataclass
class TinyDataset:
    data_dir: Path
    raw: Path
    preprocessed: Path
    convert_output: str
    plan_output: str

    def activate(self):
        use_data_dir(self.data_dir)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> TinyDataset:
    """12 cases of 32³ (4 centers × 3, vendors Siemens, GE, Philips, Siemens), converted and planned
    with preprocessing through calib_convert and calib_plan_and_preprocess."""
    from calibnet.cli import convert, plan_and_preprocess

    snapshot = _EnvSnapshot()
    snapshot.clear()
    data_dir = tmp_path_factory.mktemp("calibnet_data")
    os.environ["CALIBNET_DATA"] = str(data_dir)
    try:
        converted = run_cli(convert.main, ["synthetic", "-d", TINY_ID, "--name", TINY_NAME, "--shape", 32,
                                           "--cases-per-center", 3, "--seed", 7, "-np", 2])
        planned = run_cli(plan_and_preprocess.main, ["-d", TINY_ID, "-np", 2])
    finally:
        snapshot.restore()
    name = f"Dataset{TINY_ID}_{TINY_NAME}"
    return TinyDataset(data_dir, data_dir / "raw" / name, data_dir / "preprocessed" / name,
                       converted.output, planned.output)


@pytest.fixture
def results(tiny_dataset, tmp_path):
    """The tiny dataset's raw and preprocessed data with a results root of this test's own."""
    os.environ.update({"nnUNet_raw": str(tiny_dataset.data_dir / "raw"),
                       "nnUNet_preprocessed": str(tiny_dataset.data_dir / "preprocessed"),
                       "nnUNet_results": str(tmp_path / "results")})
    return tmp_path / "results"


@pytest.fixture
def raw_copy(tiny_dataset, tmp_path):
    """A fresh CALIBNET_DATA holding a copy of the tiny raw dataset under id 512, to damage at will."""
    target = tmp_path / "data" / "raw" / f"Dataset512_{TINY_NAME}"
    shutil.copytree(tiny_dataset.raw, target)
    os.environ["CALIBNET_DATA"] = str(tmp_path / "data")
    return target


@dataclass
class TrainedRun:
    data_dir: Path  # the tiny dataset's CALIBNET_DATA (raw and preprocessed)
    results: Path  # a results root of this run's own
    folder: Path  # the run folder

    def activate(self):
        """Point the roots at the tiny dataset and this run's results root."""
        os.environ.update({"nnUNet_raw": str(self.data_dir / "raw"),
                           "nnUNet_preprocessed": str(self.data_dir / "preprocessed"),
                           "nnUNet_results": str(self.results)})


@pytest.fixture(scope="session")
def nnunet_run(tiny_dataset, tmp_path_factory) -> TrainedRun:
    """nnunet trained by calib_train on loco fold 0 of the tiny dataset (1 epoch of 2 iterations, CPU), in a results
    root of its own. Tests read it; to damage it, copy it (``shutil.copytree(run.results, ...)``)."""
    results = tmp_path_factory.mktemp("nnunet_run") / "results"
    run = TrainedRun(tiny_dataset.data_dir, results, results / f"Dataset{TINY_ID}_{TINY_NAME}"
                     / "nnUNetTrainerCalib__CalibPlans__3d_fullres" / "loco_fold0_seed42")
    train_tiny_nnunet(run, 0)
    return run


def train_tiny_nnunet(run: TrainedRun, fold: int) -> None:
    """calib_train nnunet on loco ``fold`` of the tiny dataset into ``run``'s results root (1 epoch of 2
    iterations, CPU), leaving the environment as it was."""
    from calibnet.cli import train

    snapshot = _EnvSnapshot()
    snapshot.clear()
    try:
        run.activate()
        run_cli(train.main, [TINY_ID, "3d_fullres", "nnunet", fold, "--epochs", 1, "--iters-per-epoch", 2,
                             "--device", "cpu", "--disable-tta", "--num-workers", 0])
    finally:
        snapshot.restore()
