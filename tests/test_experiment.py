"""calib_experiment on the tiny dataset: a grid of calib_train runs killed mid-way and resumed without redoing a
finished cell (local executor, then submitit's local executor for real), failed cells kept with their log and
retried, malformed experiment files refused before anything runs (naming FILE:LINE), --dry-run, and the SLURM
submission (array job, resources, --no-wait, no second submission of queued cells) through stand-in sbatch,
srun and sacct commands."""
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from calibnet.cli import experiment as experiment_cli
from calibnet.launch.grid import LOCK_NAME, CellJob, cell_finished, run_cell
from calibnet.methods import METHODS
from calibnet.runs import model_checkpoint
from conftest import run_cli

pytestmark = pytest.mark.slow

GRID = """\
name: {name}
dataset: 511
configuration: 2d
split: loco
folds: [0, 1]
seeds: [{seeds}]
train:
  epochs: 1
  iters-per-epoch: 1
  device: cpu
  disable-tta: true
  num-workers: 0
methods:
  - nnunet
  - unet_cmp: {{lambda-cmp: 0.4}}
evaluate: {evaluate}
"""


@pytest.fixture
def results(tiny_dataset, tmp_path):
    """The tiny dataset's raw and preprocessed data with a results root of this test's own."""
    os.environ.update({"nnUNet_raw": str(tiny_dataset.data_dir / "raw"),
                       "nnUNet_preprocessed": str(tiny_dataset.data_dir / "preprocessed"),
                       "nnUNet_results": str(tmp_path / "results")})
    return tmp_path / "results"


def _grid(tmp_path, name="grid", seeds="101, 102", evaluate="false", replace=None):
    text = GRID.format(name=name, seeds=seeds, evaluate=evaluate)
    if replace:
        assert replace[0] in text
        text = text.replace(*replace)
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path


def _cells(results, seeds, methods=("nnunet", "unet_cmp"), folds=(0, 1)):
    """{cell name: run folder} of a grid on loco, 2d."""
    return {f"{m}_loco_fold{f}_seed{s}": results / "Dataset511_Tiny" / f"{METHODS[m].class_name}__CalibPlans__2d"
            / f"loco_fold{f}_seed{s}" for m in methods for f in folds for s in seeds}


def _stamps(folder):
    """Modification times of what a finished run wrote: model checkpoint, record, predictions."""
    paths = [model_checkpoint(folder), folder / "calibnet_run.json", folder / "predictions" / "val" / "confidence.json",
             folder / "predictions" / "test" / "confidence.json"]
    return [p.stat().st_mtime_ns for p in paths]


def _kill_once_a_cell_finished(command, folders, log_file, timeout=900):
    """Run ``command`` in a session of its own and SIGKILL the whole session (command and running cells) as soon
    as one cell is finished; fails if it ended on its own first."""
    with open(log_file, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ),
                                   start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while not any(cell_finished(f) for f in folders) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        _wait_until_gone(process.pid)
    assert process.returncode == -signal.SIGKILL, log_file.read_text()


def _wait_until_gone(group: int, timeout: float = 120) -> None:
    """Wait until no live process of the process group is left: a SIGKILLed process releases its cell lock only
    when it has exited, which on a loaded machine can take a moment after the signal (zombies hold no lock)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, IndexError, ValueError):
                fields = stat.read_text().rsplit(")", 1)[1].split()
                if int(fields[2]) == group and fields[0] != "Z":
                    alive.append(stat.parent.name)
        if not alive:
            return
        time.sleep(0.2)


def test_a_grid_killed_mid_way_resumes_and_finishes_without_redoing_a_finished_cell(results, tmp_path):
    """2 methods × 2 folds × 2 seeds: the local executor (2 cells at once) is killed, with its cells, once a cell
    has finished; a rerun through submitit's local executor runs only the others, then evaluates the grid."""
    path = _grid(tmp_path, "killed", evaluate="true")
    folders = _cells(results, (101, 102))
    _kill_once_a_cell_finished([sys.executable, "-m", "calibnet.cli.experiment", str(path), "-j", "2"],
                               folders.values(), tmp_path / "killed.log")
    first = tmp_path.joinpath("killed.log").read_text()
    assert "killed: 8 of 8 cells to run with --executor local" in first and ": started" in first
    finished = {name: _stamps(folder) for name, folder in folders.items() if cell_finished(folder)}
    assert 1 <= len(finished) < len(folders), first

    states = run_cli(experiment_cli.main, [path, "--dry-run"]).output
    for name in folders:
        assert (f"  finished    {name}" in states) == (name in finished), states

    resumed = run_cli(experiment_cli.main, [path, "--executor", "submitit-local", "-j", "2"]).output
    assert f"{len(folders) - len(finished)} of 8 cells to run with --executor submitit-local ({len(finished)} " \
           f"finished)" in resumed
    assert all(cell_finished(folder) for folder in folders.values())
    assert {name: _stamps(folders[name]) for name in finished} == finished  # no finished cell was redone
    for name in folders:
        assert (f"{name}: submitted as job" in resumed) == (name not in finished), resumed
    assert "killed: 8 cells: 8 finished" in resumed
    assert "calib_evaluate --split loco -d 511 --methods nnunet,unet_cmp --folds 0,1 --seeds 101,102" in resumed
    assert (results / "Dataset511_Tiny" / "evaluation" / "loco" / "report.md").is_file()
    status = json.loads((results / "Dataset511_Tiny" / "experiments" / "killed" / "status.json").read_text())
    assert status["counts"] == {"finished": 8}

    again = run_cli(experiment_cli.main, [path, "--dry-run"]).output
    assert again.count("  finished    ") == 8


def test_a_cell_that_fails_is_reported_with_its_log_and_retried_on_rerun(results, tmp_path, monkeypatch):
    """A cell whose calib_train exits with an error (here --device cuda where CUDA is hidden): the command says
    where its log is and exits with status 1; the log holds the error; a rerun tries the cell again."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    path = _grid(tmp_path, "failing", seeds="103", replace=("device: cpu", "device: cuda"))
    path.write_text(path.read_text().replace("  - unet_cmp: {lambda-cmp: 0.4}\n", "").replace("[0, 1]", "[0]"))
    logs = results / "Dataset511_Tiny" / "experiments" / "failing" / "logs"
    for attempt in (1, 2):
        result = run_cli(experiment_cli.main, [path], expect_ok=False)
        assert result.exit_code == 1, result.output
        assert "1 of 1 cells to run" in result.output
        assert f"nnunet_loco_fold0_seed103: failed (exit status 1): see {logs / 'nnunet_loco_fold0_seed103.log'}" \
            in result.output
        log = (logs / "nnunet_loco_fold0_seed103.log").read_text()
        assert log.startswith("$ calib_train 511 2d nnunet 0 --split loco --seed 103 --epochs 1")
        assert "no CUDA device is available" in log
        status = json.loads((logs.parent / "status.json").read_text())
        assert status["cells"]["nnunet_loco_fold0_seed103"]["state"] == "failed"
    assert not list(logs.glob(".*.partial"))


# (text replaced in GRID, by what, line named, part of the message)
MALFORMED = {
    "unknown method": ("  - nnunet\n", "  - nnunett\n", 14, "unknown method 'nnunett' (did you mean 'nnunet'?)"),
    "unknown flag": ("  num-workers: 0", "  num-workerz: 0", 12, "unknown calib_train flag --num-workerz"),
    "fold out of range": ("folds: [0, 1]", "folds: [0, 4]", 5, "fold 4 is out of range: the loco split of "
                                                               "Dataset511_Tiny has folds 0 to 3"),
    "missing dataset": ("dataset: 511", "dataset: 599", 2, "run calib_plan_and_preprocess -d 599 first"),
    "configuration not preprocessed": ("configuration: 2d", "configuration: 3d_lowres", 3,
                                       "configuration 3d_lowres is not in"),
    "flag of another method": ("lambda-cmp: 0.4", "lambda-fip: 0.4", 15,
                               "--lambda-fip does not apply to method unet_cmp"),
    "train flag one method refuses": ("  num-workers: 0\n", "  num-workers: 0\n  lambda-cmp: 0.3\n", 13,
                                      "--lambda-cmp does not apply to method nnunet"),
    "bad flag value": ("device: cpu", "device: gpu", 10, "'gpu' is not one of 'cpu', 'cuda'"),
    "variant flag": ("  - nnunet\n", "  - safeclick: {backbone: litemedsam}\n", 14,
                     "list safeclick_lite under methods instead"),
    "method twice": ("  - nnunet\n", "  - unet_cmp\n", 15, "method unet_cmp is listed twice (line 14)"),
    "seed per method": ("  - nnunet\n", "  - nnunet: {seed: 3}\n", 14, "list the seeds under `seeds:`"),
    "unknown key": ("evaluate: false", "evaluate: false\nevalute: true", 17, "unknown key 'evalute'"),
    "bad YAML": ("folds: [0, 1]", "folds: [0, 1", 6, "not valid YAML"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_a_malformed_experiment_is_refused_before_anything_runs_naming_its_line(results, tmp_path, case):
    old, new, line, message = MALFORMED[case]
    path = _grid(tmp_path, replace=(old, new))
    result = run_cli(experiment_cli.main, [path], expect_ok=False)
    assert result.exit_code == 1, result.output
    assert f"Error: {path}:{line}: " in result.output and message in result.output, result.output
    assert not (results / "Dataset511_Tiny").exists()  # nothing ran, nothing was written


def test_dry_run_lists_every_cell_with_its_state_and_command_and_writes_nothing(results, tmp_path):
    output = run_cli(experiment_cli.main, [_grid(tmp_path), "--dry-run"]).output
    assert "grid: 8 cells (2 methods × 2 folds × 2 seeds) of Dataset511_Tiny 2d, loco split" in output
    assert output.count("  to run      ") == 8
    assert (f"  to run      {'unet_cmp_loco_fold1_seed102':<40} calib_train 511 2d unet_cmp 1 --split loco --seed 102 "
            "--epochs 1 --iters-per-epoch 1 --device cpu --disable-tta --num-workers 0 --lambda-cmp 0.4") in output
    assert not (results / "Dataset511_Tiny").exists()


def test_a_cell_whose_lock_another_process_holds_is_left_alone(results, tmp_path):
    """While a process holds a cell's lock (a calib_train of an earlier, killed command still running), the cell
    counts as running: listed with the holder, and its job returns without running anything."""
    path = _grid(tmp_path, seeds="104")
    folder = _cells(results, (104,))["nnunet_loco_fold0_seed104"]
    folder.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'w'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); f.write('calib_train pid 1 on elsewhere'); f.flush(); "
                               "print('locked', flush=True); time.sleep(600)", str(folder / LOCK_NAME)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        output = run_cli(experiment_cli.main, [path, "--dry-run"]).output
        assert f"  running     {'nnunet_loco_fold0_seed104':<40} (its lock is held by calib_train pid 1 on " \
               "elsewhere)" in output
        assert output.count("  to run      ") == 3
        job = CellJob("nnunet_loco_fold0_seed104", ("511",), folder, (), True, tmp_path / "logs", {}, sys.executable)
        outcome = run_cell(job)
        assert (outcome.state, outcome.message, outcome.mode) == ("running", "calib_train pid 1 on elsewhere", "")
        assert not (tmp_path / "logs").exists()
    finally:
        holder.kill()
        holder.wait()


def _fake_slurm(tmp_path, monkeypatch, sacct_state):
    """sbatch (records each submission), srun and sacct (every job in ``sacct_state``) on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scripts = {"sbatch": f'cp "$1" "{tmp_path}/submission_$(ls {tmp_path} | grep -c submission_).sh"\n'
                         'echo "Submitted batch job 4242"\n',
               "srun": "exit 0\n",
               "sacct": f"printf 'JobID|State|NodeList\\n4242_[0-7]|{sacct_state}|\\n'\n"}
    for name, body in scripts.items():
        (bin_dir / name).write_text("#!/bin/sh\n" + body)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def test_slurm_submits_one_array_job_with_the_resources_asked_and_never_resubmits_queued_cells(
        results, tmp_path, monkeypatch):
    path = _grid(tmp_path, "onslurm")
    refused = run_cli(experiment_cli.main, [path, "--executor", "slurm"], expect_ok=False)
    assert "--executor slurm needs --time MINUTES" in refused.output
    refused = run_cli(experiment_cli.main, [path, "--executor", "slurm", "--time", 30], expect_ok=False)
    assert "no SLURM here (srun is not on PATH)" in refused.output

    _fake_slurm(tmp_path, monkeypatch, "PENDING")
    flags = ["--executor", "slurm", "--no-wait", "--time", 30, "--partition", "gpu", "-j", 3, "--gpus-per-job", 1,
             "--mem-gb", 16]
    output = run_cli(experiment_cli.main, [path, *flags]).output
    assert [line.split(": submitted as job ")[1] for line in output.splitlines() if "submitted as job" in line] == \
        [f"4242_{i}" for i in range(8)]
    script = (tmp_path / "submission_0.sh").read_text()
    for line in ("#SBATCH --array=0-7%3", "#SBATCH --partition=gpu", "#SBATCH --time=30", "#SBATCH --gpus-per-node=1",
                 "#SBATCH --mem=16GB", "#SBATCH --job-name=calib_onslurm"):
        assert line in script
    status = json.loads((results / "Dataset511_Tiny" / "experiments" / "onslurm" / "status.json").read_text())
    assert status["counts"] == {"submitted": 8}

    again = run_cli(experiment_cli.main, [path, *flags]).output  # the jobs are still pending: nothing submitted
    assert "0 of 8 cells to run with --executor slurm (8 submitted)" in again and not (tmp_path / "submission_1.sh").exists()
