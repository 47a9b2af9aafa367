"""calib_experiment on the tiny dataset: a grid of calib_train runs killed mid-way and resumed without redoing a
finished cell (local executor, then submitit's local executor for real), failed cells kept with their log and
retried, malformed experiment files refused before anything runs (naming FILE:LINE), --dry-run, and the SLURM
submission (array job, resources, --no-wait, no second submission of queued cells) through stand-in sbatch,
srun and sacct commands; confidence-head cells run after their base cells (a second wave), left "waiting for
base" when the base fails, their entries refused naming FILE:LINE."""
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


def _grid(tmp_path, name="grid", seeds="101, 102", evaluate="false", replace=None, template=GRID):
    text = template.format(name=name, seeds=seeds, evaluate=evaluate)
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


HEADS = """\
name: {name}
dataset: 511
configuration: 3d_fullres
split: loco
folds: [0]
seeds: [{seeds}]
train:
  epochs: 1
  iters-per-epoch: 2
  device: cpu
  disable-tta: true
  num-workers: 0
methods:
  - nnunet
  - confidence_head: {{base: nnunet, warmup-batches: 1}}
evaluate: {evaluate}
"""


def _heads_grid(tmp_path, name, seed, evaluate="false", replace=None):
    return _grid(tmp_path, name, seed, evaluate, replace, template=HEADS)


def _base_folder(results, seed, method="nnunet"):
    return (results / "Dataset511_Tiny" / f"{METHODS[method].class_name}__CalibPlans__3d_fullres"
            / f"loco_fold0_seed{seed}")


def test_a_confidence_head_runs_after_its_base_writes_its_scores_and_a_rerun_skips_both(results, tmp_path):
    """nnunet + confidence_head {base: nnunet} on one fold and seed: the head waits for its base (--dry-run),
    runs in the second wave once the base has finished, writes its checkpoint into the base run and its scores
    into the base's val and test confidence.json; calib_evaluate gets the base method; a rerun runs nothing."""
    path = _heads_grid(tmp_path, "heads", 105, evaluate="true")
    base, head = "nnunet_loco_fold0_seed105", "confidence_head-nnunet_loco_fold0_seed105"
    plan = run_cli(experiment_cli.main, [path, "--dry-run"]).output
    assert "heads: 2 cells (2 methods × 1 fold × 1 seed)" in plan
    assert f"  to run      {base:<40} calib_train 511 3d_fullres nnunet 0 --split loco --seed 105" in plan
    assert (f"  waiting for base {head} calib_train 511 3d_fullres confidence_head 0 --split loco --seed 105 --base "
            f"nnunet --epochs 1 --iters-per-epoch 2 --device cpu --disable-tta --num-workers 0 --warmup-batches 1  "
            f"# after {base}") in plan, plan

    output = run_cli(experiment_cli.main, [path, "-j", 2]).output  # two at once, yet the head waits for its base
    assert "heads: 1 of 2 cells to run with --executor local (1 waiting for base)" in output
    lines = output.splitlines()
    assert lines.index(f"{head}: started") > next(i for i, line in enumerate(lines) if f"] {base}: finished" in line)
    assert "1 waiting for base: a confidence-head cell runs once its base cell has finished." in output
    assert "heads: 1 of 1 waiting for base to run now (their base cells have finished)" in output
    assert "heads: 2 cells: 2 finished (2 run now)" in output
    assert "calib_evaluate --split loco -d 511 --methods nnunet --folds 0 --seeds 105" in output

    folder = _base_folder(results, 105)
    assert (folder / "confidence_head" / "checkpoint_final.pth").is_file()
    for role in ("val", "test"):
        scores = json.loads((folder / "predictions" / role / "confidence.json").read_text())
        assert scores and all("adversarial_head_predicted_dice" in case for case in scores.values())
    logs = results / "Dataset511_Tiny" / "experiments" / "heads" / "logs"
    assert (logs / f"{head}.log").read_text().startswith(
        "$ calib_train 511 3d_fullres confidence_head 0 --split loco --seed 105 --base nnunet")
    status = json.loads((logs.parent / "status.json").read_text())
    assert status["cells"][head]["state"] == "finished" and status["cells"][head]["base"] == base
    assert status["cells"][head]["folder"] == str(folder / "confidence_head")
    table = (results / "Dataset511_Tiny" / "evaluation" / "loco" / "failure_detection.csv").read_text()
    assert "adversarial_head_predicted_dice" in table

    stamps = _stamps(folder) + [(folder / "confidence_head" / "checkpoint_final.pth").stat().st_mtime_ns]
    again = run_cli(experiment_cli.main, [path, "--dry-run"]).output
    assert again.count("  finished    ") == 2
    rerun = run_cli(experiment_cli.main, [path]).output
    assert "heads: 0 of 2 cells to run with --executor local (2 finished)" in rerun and ": started" not in rerun
    assert _stamps(folder) + [(folder / "confidence_head" / "checkpoint_final.pth").stat().st_mtime_ns] == stamps


def test_a_head_whose_base_cell_fails_is_left_waiting_for_its_base(results, tmp_path, monkeypatch):
    """The base cell fails (--device cuda where CUDA is hidden): its head is not run and is 'waiting for base' in
    the summary and status.json, not a failure of its own; the command exits with status 1."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    path = _heads_grid(tmp_path, "nobase", 106, replace=("  - nnunet\n", "  - nnunet: {device: cuda}\n"))
    base, head = "nnunet_loco_fold0_seed106", "confidence_head-nnunet_loco_fold0_seed106"
    result = run_cli(experiment_cli.main, [path], expect_ok=False)
    assert result.exit_code == 1, result.output
    assert f"[1/1] {base}: failed (exit status 1)" in result.output
    assert "nobase: 2 cells: 1 failed, 1 waiting for base" in result.output
    assert "1 waiting for base: confidence-head cells whose base cell has not finished (not failures of the heads)" \
        in result.output
    logs = results / "Dataset511_Tiny" / "experiments" / "nobase" / "logs"
    assert not (logs / f"{head}.log").exists() and not (_base_folder(results, 106) / "confidence_head").exists()
    status = json.loads((logs.parent / "status.json").read_text())
    assert status["counts"] == {"failed": 1, "waiting for base": 1}
    assert status["cells"][head]["state"] == "waiting for base" and status["cells"][head]["base"] == base
    plan = run_cli(experiment_cli.main, [path, "--dry-run"]).output
    assert f"  failed      {base}" in plan and f"  waiting for base {head}" in plan


HEAD_BASE = "  - confidence_head: {base: nnunet, warmup-batches: 1}\n"
# (text replaced in HEADS, by what, line named, part of the message)
MALFORMED_HEADS = {
    "missing base": (HEAD_BASE, "  - confidence_head: {warmup-batches: 1}\n", 15,
                     "confidence_head needs base: the method whose runs"),
    "no flags at all": (HEAD_BASE, "  - confidence_head\n", 15, "confidence_head needs base"),
    "unknown base": (HEAD_BASE, "  - confidence_head: {base: nnunett}\n", 15,
                     "base: unknown method 'nnunett' (did you mean 'nnunet'?)"),
    "base is a head": (HEAD_BASE, "  - confidence_head: {base: confidence_head}\n", 15,
                       "base: confidence_head is itself a confidence head"),
    "base a SAM method": (HEAD_BASE, "  - confidence_head: {base: samft}\n", 15,
                          "--base samft: a confidence head attaches to an nnU-Net U-Net"),
    "base on its own line": (HEAD_BASE, "  - confidence_head:\n      warmup-batches: 1\n      base: unet\n", 17,
                             "base: unknown method 'unet'"),
    "head twice": (HEAD_BASE, HEAD_BASE + "  - confidence_head: {base: nnunet}\n", 16,
                   "confidence_head on nnunet is listed twice (line 15)"),
    "base under train": ("  num-workers: 0\n", "  num-workers: 0\n  base: nnunet\n", 13,
                         "--base is not given to every cell"),
    "base not in the grid and not trained": ("  - nnunet\n", "  - unet_cmp\n", 15,
                                             "nnunet is not a method of this grid, so its runs must be trained "
                                             "already (or list nnunet under methods): no finished nnunet run in"),
}


@pytest.mark.parametrize("case", MALFORMED_HEADS)
def test_a_malformed_head_entry_is_refused_before_anything_runs_naming_its_line(results, tmp_path, case):
    old, new, line, message = MALFORMED_HEADS[case]
    path = _heads_grid(tmp_path, "badheads", 107, replace=(old, new))
    result = run_cli(experiment_cli.main, [path], expect_ok=False)
    assert result.exit_code == 1, result.output
    assert f"Error: {path}:{line}: " in result.output and message in result.output, result.output
    assert not (results / "Dataset511_Tiny").exists()


def test_a_plain_and_an_adversarial_head_on_one_base_are_two_cells(results, tmp_path):
    path = _heads_grid(tmp_path, "twoheads", 108, replace=(
        HEAD_BASE, HEAD_BASE + "  - confidence_head: {base: nnunet, no-adversarial: true}\n"))
    plan = run_cli(experiment_cli.main, [path, "--dry-run"]).output
    folder = _base_folder(results, 108)
    assert "confidence_head-nnunet_loco_fold0_seed108" in plan
    assert ("confidence_head_plain-nnunet_loco_fold0_seed108 calib_train 511 3d_fullres confidence_head 0 --split "
            "loco --seed 108 --base nnunet --epochs 1 --iters-per-epoch 2 --device cpu --disable-tta --num-workers 0 "
            "--no-adversarial") in plan, plan
    from calibnet.cli.experiment import train_parser
    from calibnet.launch.experiment import load_experiment
    from calibnet.paths import setup_data_roots
    cells = {c.name: c for c in load_experiment(path, train_parser(), setup_data_roots()).cells}
    assert cells["confidence_head_plain-nnunet_loco_fold0_seed108"].folder == folder / "confidence_head_plain"
    assert cells["confidence_head-nnunet_loco_fold0_seed108"].folder == folder / "confidence_head"


def test_slurm_no_wait_submits_the_base_and_leaves_its_head_for_a_rerun(results, tmp_path, monkeypatch):
    """With --no-wait a head cannot follow its base in this command: only the base is submitted; the head waits
    for it (status.json), and the rerun, while the base is still queued, submits nothing."""
    _fake_slurm(tmp_path, monkeypatch, "PENDING")
    (tmp_path / "bin" / "sacct").write_text("#!/bin/sh\nprintf 'JobID|State|NodeList\\n4242|PENDING|\\n'\n")
    path = _heads_grid(tmp_path, "slurmheads", 109)
    flags = ["--executor", "slurm", "--no-wait", "--time", 30]
    output = run_cli(experiment_cli.main, [path, *flags]).output
    assert "nnunet_loco_fold0_seed109: submitted as job 4242\n" in output  # an array of one task
    assert "1 waiting for base: with --no-wait, a rerun submits a confidence-head cell once its base cell has " \
        "finished." in output
    assert output.count("submitted as job") == 1
    status = json.loads((results / "Dataset511_Tiny" / "experiments" / "slurmheads" / "status.json").read_text())
    assert status["counts"] == {"submitted": 1, "waiting for base": 1}
    again = run_cli(experiment_cli.main, [path, *flags]).output
    assert "0 of 2 cells to run with --executor slurm (1 submitted, 1 waiting for base)" in again
    assert not (tmp_path / "submission_1.sh").exists()
