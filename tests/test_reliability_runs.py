"""A run survives what users and machines do to it (issue 17, items 2 and 3): a finished run is kept unless
--overwrite, which replaces it only once the new one has trained; a run folder takes one calib_train at a time (a
second is refused naming the holder's pid; a lock left by a dead process is taken over); a killed training resumes
from checkpoint_latest.pth on a plain rerun; the data-augmentation workers of a killed calib_train die with it."""
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from calibnet.cli import train as train_cli
from calibnet.runs import busy_lock_path
from conftest import run_cli

pytestmark = pytest.mark.slow
RUN = [511, "3d_fullres", "nnunet"]
SHORT = ["--epochs", 1, "--iters-per-epoch", 2, "--device", "cpu", "--disable-tta", "--num-workers", 0]
LONG = ["--epochs", 1000, "--iters-per-epoch", 2, "--device", "cpu", "--disable-tta", "--num-workers", 2]
HOLD = ("import sys, time; from pathlib import Path; from calibnet.launch.run_lock import run_lock\n"
        "with run_lock(Path(sys.argv[1])):\n    print('locked', flush=True)\n    time.sleep(600)\n")


def _roots(tiny_dataset, results: Path) -> dict:
    return {"nnUNet_raw": str(tiny_dataset.data_dir / "raw"),
            "nnUNet_preprocessed": str(tiny_dataset.data_dir / "preprocessed"), "nnUNet_results": str(results)}


def _folder(results: Path, fold: int) -> Path:
    return results / "Dataset511_Tiny" / "nnUNetTrainerCalib__CalibPlans__3d_fullres" / f"loco_fold{fold}_seed42"


@pytest.fixture(scope="module")
def finished(tiny_dataset, tmp_path_factory):
    """(data roots, run folder) of nnunet trained on loco fold 0 (1 epoch of 2 iterations) in a results root of this
    module's own."""
    roots = _roots(tiny_dataset, tmp_path_factory.mktemp("reliability") / "results")
    saved = {k: os.environ.get(k) for k in roots}
    os.environ.update(roots)
    try:
        run_cli(train_cli.main, [*RUN, 0, *SHORT])
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return roots, _folder(Path(roots["nnUNet_results"]), 0)


def _hashes(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _error(output: str) -> str:
    errors = [line for line in output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in output, output
    return errors[0]


def _leftovers(folder: Path) -> list:
    """What lies beside the run folder for it: its lock file, temporary folders of an --overwrite."""
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}."))


def test_a_finished_run_is_refused_without_overwrite_and_left_as_it_was(finished):
    roots, folder = finished
    os.environ.update(roots)
    before = _hashes(folder)
    assert "checkpoint_final.pth" in before and "calibnet_run.json" in before
    result = run_cli(train_cli.main, [*RUN, 0, *SHORT], expect_ok=False)
    assert result.exit_code == 1
    error = _error(result.output)
    assert f"{folder} holds a finished run" in error and "--overwrite" in error and "--predict-only" in error
    assert _hashes(folder) == before
    assert _leftovers(folder) == []  # no lock file, no temporary folder left


def _holder(folder: Path) -> subprocess.Popen:
    """A process holding the run's lock (calibnet's own run_lock) until it is killed."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).parents[1])
    assert holder.stdout.readline().strip() == "locked"
    return holder


@pytest.mark.parametrize("fold, flags", [(0, ["--overwrite"]), (0, ["--predict-only"]), (2, [])])
def test_a_second_process_on_a_run_is_refused_naming_the_pid_that_holds_it(finished, fold, flags):
    roots, trained = finished
    os.environ.update(roots)
    folder = _folder(trained.parents[2], fold)
    before = _hashes(folder) if folder.exists() else None
    holder = _holder(folder)
    try:
        result = run_cli(train_cli.main, [*RUN, fold, *SHORT, *flags], expect_ok=False)
    finally:
        holder.kill()
        holder.wait()
        busy_lock_path(folder).unlink()  # left by the killed holder
    assert result.exit_code == 1
    assert f"{folder} is in use: process {holder.pid} (calib_train on {socket.gethostname()}" in _error(result.output)
    assert (_hashes(folder) if folder.exists() else None) == before  # fold 2: no run folder made


def test_a_live_pid_written_in_the_lock_file_holds_the_run_too(finished):
    """Where flock is not available (or only the file is there), the pid it names decides."""
    from calibnet.launch.run_lock import holder_line

    roots, folder = finished
    os.environ.update(roots)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    lock = busy_lock_path(folder)
    try:
        lock.write_text(holder_line(sleeper.pid, command="calib_train") + "\n")
        result = run_cli(train_cli.main, [*RUN, 0, "--predict-only", "--device", "cpu", "--disable-tta"],
                         expect_ok=False)
        assert result.exit_code == 1 and f"process {sleeper.pid} (calib_train" in _error(result.output)
        assert json.loads(lock.read_text())["pid"] == sleeper.pid  # the holder's lock is left alone
    finally:
        sleeper.kill()
        sleeper.wait()
        lock.unlink(missing_ok=True)


def test_a_stale_lock_of_a_dead_process_is_taken_over_with_a_note(finished):
    from calibnet.launch.run_lock import holder_line

    roots, folder = finished
    os.environ.update(roots)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    busy_lock_path(folder).write_text(holder_line(dead.pid) + "\n")
    output = run_cli(train_cli.main, [*RUN, 0, "--predict-only", "--device", "cpu", "--disable-tta"]).output
    assert f"note: .{folder.name}.lock was left by process {dead.pid} on {socket.gethostname()}, which has ended" \
        in output
    assert "test predictions:" in output
    assert not busy_lock_path(folder).exists()  # released at the end


def test_continue_says_which_checkpoint_and_epoch_it_resumes_from(finished):
    roots, folder = finished
    os.environ.update(roots)
    output = run_cli(train_cli.main, [*RUN, 0, "--continue", *SHORT]).output
    assert f"resuming {folder} from checkpoint_final.pth at epoch 1 of 1" in output


def test_overwrite_retrains_and_replaces_the_run_once_trained(finished):
    roots, folder = finished
    os.environ.update(roots)
    (folder / "marker.txt").write_text("of the old run")
    started = time.time()
    output = run_cli(train_cli.main, [*RUN, 0, *SHORT, "--overwrite"]).output
    assert f"--overwrite: training afresh beside {folder}; the finished run there is replaced" in output
    assert f"--overwrite: the new run has replaced the previous one in {folder}" in output
    assert f"trained nnunet: {folder} (" in output
    assert not (folder / "marker.txt").exists()
    checkpoint = torch.load(folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert min(checkpoint["logging"]["epoch_start_timestamps"]) >= started
    assert json.loads((folder / "calibnet_run.json").read_text())["seconds"]["training"] > 0
    assert (folder / "predictions" / "test" / "confidence.json").is_file()
    assert _leftovers(folder) == []


def test_overwrite_and_continue_or_predict_only_do_not_go_together(finished):
    roots, folder = finished
    os.environ.update(roots)
    for flag in ("--continue", "--predict-only"):
        result = run_cli(train_cli.main, [*RUN, 0, *SHORT, "--overwrite", flag], expect_ok=False)
        assert result.exit_code == 2 and f"--overwrite trains the run afresh; it does not go with {flag}" in \
            result.output


# --- a killed calib_train (a real process) ----------------------------------------------------------------------

def _descendants(pid: int) -> set:
    """The live (not zombie) processes under ``pid``."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found.update(kids)
        todo += kids
    return found


def _alive(pids: set) -> set:
    alive = set()
    for pid in pids:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                alive.add(pid)
        except (OSError, IndexError):
            pass
    return alive


def _wait_for(condition, seconds: float, what: str, log: Path, process: subprocess.Popen | None = None):
    """Poll ``condition`` until it holds (returning its value); fail after ``seconds``, or once ``process`` ends."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if process is not None and process.poll() is not None:
            pytest.fail(f"calib_train ended (status {process.returncode}) before {what}:\n{log.read_text()[-3000:]}")
        time.sleep(0.3)
    pytest.fail(f"{what} did not happen within {seconds} s; calib_train's output:\n{log.read_text()[-3000:]}")


def _start_training(tmp_path, fold: int, *flags) -> tuple[subprocess.Popen, Path]:
    log = tmp_path / "calib_train.log"
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "calibnet.cli.train", *map(str, [*RUN, fold, *LONG, *flags])],
                                   stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"}, cwd=Path(__file__).parents[1])
    return process, log


def _kill_when_trained_an_epoch(process, log: Path, checkpoints, signum) -> set:
    """Send ``signum`` once a checkpoint_latest.pth is written and the augmentation workers run; returns the
    workers (every process under calib_train)."""
    try:
        _wait_for(lambda: any(True for _ in checkpoints()), 600, "a checkpoint_latest.pth", log, process)
        workers = _wait_for(lambda: _descendants(process.pid) if len(_descendants(process.pid)) >= 2 else None, 120,
                            "the data-augmentation workers", log, process)
        process.send_signal(signum)
        process.wait(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return workers


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigkill_during_overwrite_keeps_the_old_run_and_leaves_no_workers(finished, tmp_path):
    roots, folder = finished
    os.environ.update(roots)
    before = _hashes(folder)
    process, log = _start_training(tmp_path, 0, "--overwrite")
    workers = _kill_when_trained_an_epoch(
        process, log, lambda: folder.parent.glob(f".{folder.name}.*.partial/checkpoint_latest.pth"), signal.SIGKILL)
    assert process.returncode == -signal.SIGKILL
    _wait_for(lambda: not _alive(workers), 90, "the end of the workers of the killed calib_train", log)
    assert _hashes(folder) == before  # the old run, untouched

    result = run_cli(train_cli.main, [*RUN, 0, *SHORT], expect_ok=False)  # the next calib_train cleans up
    assert f"note: .{folder.name}.lock was left by process {process.pid}" in result.output
    assert "removed 1 unfinished --overwrite training(s) of a process that has ended" in result.output
    assert "holds a finished run" in _error(result.output)
    assert _leftovers(folder) == [] and _hashes(folder) == before


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigterm_stops_training_with_its_workers_and_a_plain_rerun_resumes_from_the_latest_checkpoint(
        finished, tmp_path):
    roots, trained = finished
    os.environ.update(roots)
    folder = _folder(trained.parents[2], 1)
    process, log = _start_training(tmp_path, 1)
    workers = _kill_when_trained_an_epoch(process, log, lambda: folder.glob("checkpoint_latest.pth"), signal.SIGTERM)
    assert process.returncode == -signal.SIGTERM, log.read_text()[-3000:]  # ended by the signal, as asked
    _wait_for(lambda: not _alive(workers), 90, "the end of the workers of the stopped calib_train", log)
    assert not busy_lock_path(folder).exists()  # released on the way out
    assert not (folder / "checkpoint_final.pth").exists() and not (folder / "calibnet_run.json").exists()
    epoch = torch.load(folder / "checkpoint_latest.pth", map_location="cpu", weights_only=False)["current_epoch"]
    assert epoch >= 1

    output = run_cli(train_cli.main, [*RUN, 1, *SHORT[2:], "--epochs", epoch + 1]).output
    assert f"{folder} holds an interrupted training (checkpoint_latest.pth, no checkpoint_final.pth): continuing " \
           f"it; pass --overwrite to train from scratch instead" in output
    assert f"resuming {folder} from checkpoint_latest.pth at epoch {epoch} of {epoch + 1}" in output
    final = torch.load(folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert final["current_epoch"] == epoch + 1
    assert len(final["logging"]["train_losses"]) == epoch + 1  # the earlier epochs' log came back with the state
    assert json.loads((folder / "calibnet_run.json").read_text())["epochs"] == epoch + 1
