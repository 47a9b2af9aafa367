"""Running the cells of an experiment (``calibnet.launch.experiment``), resumably, where the compute is.

Each cell is ``python -m calibnet.cli.train ARGV`` in a subprocess, run by :func:`run_cell` — a module-level
function, so that submitit can pickle it for SLURM — with the data roots of the submitting command. A cell is
finished when its run folder holds the model checkpoint, calibnet_run.json and every prediction set it writes
(``runs.py``); finished cells are never run again. While a cell runs, its process holds an exclusive lock on
``.calib_experiment.lock`` in the run folder, so a second attempt (a rerun while a killed command's cells still
run, a job submitted twice) finds it busy and leaves it alone. An interrupted cell of a method that trains
continues from its checkpoint (``calib_train --continue``); one whose continuation failed starts afresh
(``calib_train --overwrite``).

Confidence-head cells (``Cell.head``) read a base run: one is finished when its checkpoint is there, newer than
the base's model, and the base's val and test ``confidence.json`` hold its scores for every case; an
interrupted head is trained again from the start (calib_train has no ``--continue`` for heads). A head whose
base is a cell of the grid (``Cell.base``) runs in a second wave, after the first wave (every other cell to
run) has ended, and only if its base cell has finished; until then its state is ``waiting for base``, which is
not a failure of the head. Heads of one base run take turns (``.calib_experiment.heads.lock`` in the base run):
each scoring pass rewrites the base's confidence.json with the scores of every head it finds.

Executors: ``local`` (``concurrent.futures`` threads, each waiting on its cell's subprocess: sequential, or
``-j N`` at once), ``submitit-local`` and ``slurm`` (``submitit.AutoExecutor``, cells submitted with
``map_array``: a SLURM array job with at most ``-j`` tasks at once; the local executor of submitit runs the
same jobs as processes on this machine, ``-j`` at a time).

Under ``$nnUNet_results/DatasetXXX/experiments/<name>/``: ``logs/<cell>.log`` (stdout and stderr of the last
attempt, written as ``.<cell>.log.partial`` while it runs), ``logs/<cell>.json`` (its outcome),
``status.json`` (every cell's state, rewritten as cells end) and ``submitit/`` (submitit's own files).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from calibnet.errors import CalibnetError
from calibnet.files import atomic_write_json
from calibnet.launch.experiment import Cell, Experiment, HeadTarget
from calibnet.paths import DataRoots
from calibnet.runs import (CONFIDENCE_FILENAME, ROLES, RUN_FILENAME, model_checkpoint, prediction_folder,
                          prediction_set_complete, resume_checkpoint)

LOCK_NAME = ".calib_experiment.lock"
HEADS_LOCK_NAME = ".calib_experiment.heads.lock"  # in a base run: its heads run one at a time
WAITING = "waiting for base"  # a head whose base cell has not finished
EXECUTORS = ("local", "submitit-local", "slurm")
LOCAL_TIMEOUT_MIN = 7 * 24 * 60  # submitit's local jobs are killed after timeout_min (its default: 2 min)
POLL_SECONDS = {"submitit-local": 1.0, "slurm": 10.0}  # between looks at the jobs (SLURM: sacct, cached by submitit)
SLURM_ACTIVE = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "RESIZING",
                "SUSPENDED")


@dataclass(frozen=True)
class GridOptions:
    """How ``calib_experiment`` runs the cells (``--executor``, ``-j``, the SLURM resources, ...)."""
    executor: str = "local"
    jobs: int | None = None  # cells at once (default: local 1, submitit-local 1, slurm no limit)
    dry_run: bool = False
    wait: bool = True  # slurm: False returns once the jobs are submitted
    partition: str | None = None
    time_min: int | None = None  # per cell; required with slurm
    gpus_per_job: int | None = None
    cpus_per_job: int | None = None
    mem_gb: float | None = None
    poll_seconds: float | None = None  # default: POLL_SECONDS of the executor


@dataclass(frozen=True)
class CellJob:
    """What one job runs: a cell's calib_train argv, where its run and log go, and the submitting environment."""
    name: str
    argv: tuple
    folder: Path
    prompts: tuple
    resumable: bool
    logs: Path
    env: dict  # the data roots, absolute
    python: str
    head: HeadTarget | None = None  # a confidence head: what it writes into its base run


@dataclass
class CellOutcome:
    name: str
    state: str  # finished | failed | interrupted (killed by a signal) | running (elsewhere)
    seconds: float = 0.0
    log: str | None = None
    returncode: int | None = None
    mode: str = ""  # fresh | continue | "" (nothing run)
    message: str = ""
    job: str | None = None  # submitit job id


@dataclass
class GridResult:
    # cell -> finished | failed | interrupted | running | to run | to resume | submitted | waiting for base
    states: dict
    outcomes: list = field(default_factory=list)  # CellOutcome of the cells run now
    job_ids: list = field(default_factory=list)
    status_file: Path | None = None
    lines: list = field(default_factory=list)  # the summary calib_experiment prints at the end

    @property
    def complete(self) -> bool:
        return all(state == "finished" for state in self.states.values())


def cell_finished(folder: Path, prompts=(), head: HeadTarget | None = None) -> bool:
    """The run has its model checkpoint, its record and every prediction set (its own prompts and ``prompts``);
    a confidence head (``head``): see head_finished."""
    if head is not None:
        return head_finished(head)
    folder = Path(folder)
    return (model_checkpoint(folder) is not None and (folder / RUN_FILENAME).is_file()
            and prediction_set_complete(folder) and all(prediction_set_complete(folder, s) for s in prompts))


def head_finished(head: HeadTarget) -> bool:
    """The head's checkpoint is there and no older than the base's model (a base trained again needs its head
    trained again), and the base's val and test confidence.json hold the head's scores for every case."""
    base_model = model_checkpoint(head.base_folder)
    try:
        if base_model is None or head.checkpoint.stat().st_mtime < base_model.stat().st_mtime:
            return False
        for role in ROLES:
            cases = json.loads((prediction_folder(head.base_folder, role) / CONFIDENCE_FILENAME).read_text())
            if not cases or not all(isinstance(s, dict) and head.scores in s for s in cases.values()):
                return False
    except (OSError, ValueError):
        return False
    return True


def _last_outcome(logs: Path, name: str) -> dict:
    path = Path(logs) / f"{name}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _lock(path: Path) -> int | None:
    """An open descriptor holding an exclusive lock on ``path``; None while another process holds it. On a file
    system without locks the descriptor is returned unlocked."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError:
        pass
    return fd


def _write_holder(fd: int, text: str) -> None:
    """Say in the lock file who holds the lock (shown while the cell counts as running)."""
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{text}\n".encode(), 0)


def lock_holder(folder: Path) -> str:
    """Who holds a run folder's lock, as its holder wrote it."""
    try:
        return (Path(folder) / LOCK_NAME).read_text().strip() or "another process"
    except OSError:
        return "another process"


def _mode(job: CellJob) -> str:
    """``continue`` from the run's checkpoint, unless there is none, the method does not train, or the last
    attempt was a continuation that failed (then ``fresh``)."""
    if not job.resumable or resume_checkpoint(job.folder) is None:
        return "fresh"
    last = _last_outcome(job.logs, job.name)
    return "fresh" if last.get("mode") == "continue" and last.get("state") == "failed" else "continue"


def _wait(process: subprocess.Popen) -> int:
    """The exit status of a cell's calib_train; if this job is stopped meanwhile (Ctrl-C, a cancelled local
    job), calib_train is stopped too rather than left running."""
    try:
        return process.wait()
    except BaseException:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        raise


def run_cell(job: CellJob, on_start: Callable | None = None) -> CellOutcome:
    """Run one cell unless it is finished or running elsewhere; its output goes to ``logs/<cell>.log`` and its
    outcome to ``logs/<cell>.json``. ``on_start(process, mode)`` is called once its subprocess runs."""
    fd = _lock(Path(job.folder) / LOCK_NAME)
    if fd is None:
        return CellOutcome(job.name, "running", message=lock_holder(job.folder))
    try:
        if cell_finished(job.folder, job.prompts, job.head):
            return CellOutcome(job.name, "finished", message="finished before")
        mode = _mode(job)
        # fresh: trained from scratch, replacing what an earlier attempt left (calib_train refuses a plain rerun of a
        # finished run and resumes an interrupted one); a head is always trained afresh
        again = ["--continue"] if mode == "continue" else ["--overwrite"] if job.head is None else []
        argv = [job.python, "-m", "calibnet.cli.train", *job.argv] + again
        start = time.monotonic()
        try:
            with _heads_of_one_base(job):
                returncode = _attempt(job, argv, fd, lambda process: on_start and on_start(process, mode))
        except BaseException:  # this job was stopped (its calib_train too): say so, then stop
            _record(job, CellOutcome(job.name, "interrupted", time.monotonic() - start, mode=mode), argv)
            raise
        state = ("finished" if returncode == 0 and cell_finished(job.folder, job.prompts, job.head)
                 else "interrupted" if returncode < 0 else "failed")
        return _record(job, CellOutcome(job.name, state, time.monotonic() - start, returncode=returncode, mode=mode),
                       argv)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _heads_of_one_base(job: CellJob):
    """A head cell waits while another head of its base run runs: each head's scoring pass rewrites the base's
    val and test confidence.json with the scores of the heads it finds (and reads their checkpoints), so two
    at once could drop each other's scores."""
    if job.head is None or not Path(job.head.base_folder).is_dir():
        yield
        return
    fd = os.open(Path(job.head.base_folder) / HEADS_LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # a file system without locks
            pass
        yield
    finally:
        os.close(fd)


def _attempt(job: CellJob, argv: list, fd: int, on_start: Callable) -> int:
    """Run calib_train (holding the cell's lock ``fd``) with its output in the cell's temporary log."""
    job.logs.mkdir(parents=True, exist_ok=True)
    with open(job.logs / f".{job.name}.log.partial", "w") as out:
        out.write(f"$ calib_train {shlex.join(argv[3:])}\n# on {socket.gethostname()}, "
                  f"{datetime.now(timezone.utc).isoformat(timespec='seconds')}\n")
        out.flush()
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env={**os.environ, **job.env}, pass_fds=(fd,))
        _write_holder(fd, f"calib_train pid {process.pid} on {socket.gethostname()}")
        on_start(process)
        return _wait(process)


def _record(job: CellJob, outcome: CellOutcome, argv: list) -> CellOutcome:
    """Move the attempt's log into place and write its outcome beside it."""
    log = job.logs / f"{job.name}.log"
    with contextlib.suppress(FileNotFoundError):
        os.replace(job.logs / f".{job.name}.log.partial", log)
    outcome.log = str(log)
    atomic_write_json(job.logs / f"{job.name}.json",
                      {**asdict(outcome), "argv": list(argv[3:]), "host": socket.gethostname(),
                       "ended": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    return outcome


def cell_state(cell: Cell, logs: Path) -> str:
    """finished | running (its lock is held) | failed / interrupted (the last attempt; it will be retried) |
    to resume (an interrupted training with a checkpoint) | to run. (Whether a head waits for its base cell is
    decided in grid_states.)"""
    if cell_finished(cell.folder, cell.prompts, cell.head):
        return "finished"
    if (cell.folder / LOCK_NAME).exists():
        fd = _lock(cell.folder / LOCK_NAME)
        if fd is None:
            return "running"
        os.close(fd)
    last = _last_outcome(logs, cell.name).get("state")
    if last in ("failed", "interrupted"):
        return last
    return "to resume" if cell.resumable and resume_checkpoint(cell.folder) is not None else "to run"


def _queued_on_slurm(experiment: Experiment, states: dict) -> dict:
    """{cell: job id} of cells an earlier ``--executor slurm`` run submitted whose job SLURM still has pending or
    running (asked through submitit, i.e. sacct), so that a rerun does not submit them again."""
    try:
        previous = json.loads((experiment.folder / "status.json").read_text())
    except (OSError, ValueError):
        return {}
    submitted = {name: entry["job"] for name, entry in previous.get("cells", {}).items()
                 if entry.get("state") == "submitted" and entry.get("executor") == "slurm" and entry.get("job")
                 and states.get(name) not in (None, "finished", "running")}
    if not submitted or shutil.which("sacct") is None:
        return {}
    import submitit

    folder = experiment.folder / "submitit"
    return {name: job for name, job in submitted.items()
            if submitit.SlurmJob(folder, job).state.split(" ")[0] in SLURM_ACTIVE}


def _keep_logs_of_finished(experiment: Experiment, states: dict) -> None:
    """A cell can finish just before its command is killed: its log, still under the temporary name, is kept."""
    logs = experiment.folder / "logs"
    for name, state in states.items():
        partial = logs / f".{name}.log.partial"
        if state == "finished" and partial.is_file() and not (logs / f"{name}.log").is_file():
            os.replace(partial, logs / f"{name}.log")


def cell_job(cell: Cell, experiment: Experiment, roots: DataRoots) -> CellJob:
    env = {"nnUNet_raw": str(roots.raw), "nnUNet_preprocessed": str(roots.preprocessed),
           "nnUNet_results": str(roots.results)}
    return CellJob(cell.name, cell.argv, cell.folder, cell.prompts, cell.resumable, experiment.folder / "logs", env,
                   sys.executable, cell.head)


class _Status:
    """status.json: every cell's state, rewritten (atomically) whenever one changes."""

    def __init__(self, experiment: Experiment, states: dict, executor: str):
        self.experiment, self.executor = experiment, executor
        self.folders = {cell.name: str(cell.folder) for cell in experiment.cells}
        self.bases = {cell.name: cell.base for cell in experiment.cells if cell.base}
        self.cells = {}
        for name, state in states.items():
            self.cells[name] = {"state": state, "folder": self.folders[name], "base": self.bases.get(name)}
            self.cells[name] = {k: v for k, v in self.cells[name].items() if v is not None}
            log = experiment.folder / "logs" / f"{name}.log"
            if log.is_file():
                self.cells[name]["log"] = str(log)
        self.path = experiment.folder / "status.json"
        self.lock = threading.Lock()

    def update(self, name: str, **entry) -> None:
        with self.lock:
            self.cells[name] = {"folder": self.folders[name],
                                **({"base": self.bases[name]} if name in self.bases else {}),
                                **{k: v for k, v in entry.items() if v not in (None, "")}}
            self.write()

    def write(self) -> None:
        counts = {}
        for cell in self.cells.values():
            counts[cell["state"]] = counts.get(cell["state"], 0) + 1
        atomic_write_json(self.path, {
            "experiment": self.experiment.name, "file": str(Path(self.experiment.path).resolve()),
            "dataset": self.experiment.dataset_name, "configuration": self.experiment.configuration,
            "split": self.experiment.split, "executor": self.executor,
            "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"), "counts": counts,
            "cells": self.cells})

    def states(self) -> dict:
        return {name: cell["state"] for name, cell in self.cells.items()}


def _describe(outcome: CellOutcome) -> str:
    if outcome.state == "finished":
        return f"{outcome.name}: finished in {outcome.seconds:.0f} s" if outcome.mode else \
            f"{outcome.name}: finished before, skipped"
    if outcome.state == "running":
        return f"{outcome.name}: running elsewhere ({outcome.message}), skipped"
    cause = f"exit status {outcome.returncode}" if outcome.returncode is not None else outcome.message or "stopped"
    return f"{outcome.name}: {outcome.state} ({cause}): see {outcome.log}"


@contextlib.contextmanager
def _interruptible():
    """SIGTERM (``kill``, a scheduler ending the command) stops the local cells as Ctrl-C does. SIGINT is
    handled too, even where the command was started with it ignored (``&`` in a script): the cells then
    start with its default action, so that stopping a local submitit job (its SIGINT) stops its calib_train."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, interrupt),
                signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _run_local(jobs: list, parallel: int, report: Callable, log: Callable) -> None:
    """Run the cells in threads, ``parallel`` at once, each waiting on its subprocess; an interruption
    (Ctrl-C, SIGTERM) terminates the running cells, which are continued on the next run."""
    processes, guard, stopping = [], threading.Lock(), threading.Event()

    def starter(job):
        def started(process, mode):
            with guard:
                processes.append(process)
                if stopping.is_set():  # started while the others were being stopped
                    process.terminate()
                    return
            log(f"{job.name}: started" + (" (continuing from its checkpoint)" if mode == "continue" else ""))
        return started

    with _interruptible(), ThreadPoolExecutor(max_workers=parallel) as pool:
        futures = {pool.submit(run_cell, job, starter(job)): job for job in jobs}
        try:
            for future in as_completed(futures):
                try:
                    report(future.result())
                except Exception as e:  # a cell that could not even start (e.g. its log folder is not writable)
                    report(CellOutcome(futures[future].name, "failed", message=f"{type(e).__name__}: {e}"))
        except BaseException:
            for future in futures:
                future.cancel()
            with guard:
                stopping.set()
                for process in processes:
                    if process.poll() is None:
                        process.terminate()
            raise


def _submitit_executor(folder: Path, options: GridOptions, name: str):
    """submitit's AutoExecutor for SLURM or for local processes, with the resources of each cell."""
    import submitit

    executor = submitit.AutoExecutor(folder=folder, cluster="slurm" if options.executor == "slurm" else "local")
    executor.update_parameters(name=f"calib_{name}", timeout_min=int(options.time_min or LOCAL_TIMEOUT_MIN),
                               gpus_per_node=options.gpus_per_job, cpus_per_task=options.cpus_per_job,
                               mem_gb=options.mem_gb, slurm_partition=options.partition,
                               slurm_array_parallelism=options.jobs)
    return executor


def _job_outcome(submitted, job: CellJob) -> CellOutcome:
    """What a finished submitit job returned, or why it failed (killed, out of time, ...)."""
    try:
        outcome = submitted.result()
    except Exception as e:  # submitit raises what the job raised, or why it never returned
        message = str(e).strip().splitlines()
        outcome = CellOutcome(job.name, "failed", message=f"job {submitted.job_id}: {message[0] if message else e}",
                              log=str(submitted.paths.stderr))
    outcome.job = submitted.job_id
    return outcome


def _run_submitit(jobs: list, experiment: Experiment, options: GridOptions, report: Callable,
                  submitted_line: Callable) -> list:
    """Submit the cells with ``map_array`` (SLURM: one array job; submitit's local executor: ``-j`` at a time)
    and, unless ``--no-wait``, wait for them; returns the job ids."""
    executor = _submitit_executor(experiment.folder / "submitit", options, experiment.name)
    slurm = options.executor == "slurm"
    queue, running, ids = list(jobs), {}, []
    with _interruptible():
        try:
            while queue or running:
                free = len(queue) if slurm else (options.jobs or 1) - len(running)
                if queue and free > 0:
                    batch, queue = queue[:free], queue[free:]
                    for submitted, job in zip(executor.map_array(run_cell, batch), batch):
                        running[submitted] = job
                        ids.append(submitted.job_id)
                        submitted_line(job, submitted.job_id)
                if not options.wait:
                    return ids
                for submitted in [s for s in running if s.done()]:
                    report(_job_outcome(submitted, running.pop(submitted)))
                if queue or running:
                    time.sleep(options.poll_seconds or POLL_SECONDS[options.executor])
        except BaseException:
            if not slurm:  # local jobs end with this command; SLURM jobs run on (a rerun collects them)
                for submitted in running:
                    submitted.cancel(check=False)
            raise
    return ids


def _plan_lines(experiment: Experiment, states: dict) -> list:
    sizes = " × ".join(f"{n} {word}{'s' if n != 1 else ''}" for n, word in (
        (len(experiment.methods), "method"), (len(experiment.folds), "fold"), (len(experiment.seeds), "seed")))
    lines = [f"{experiment.name}: {len(experiment.cells)} cells ({sizes}) of {experiment.dataset_name} "
             f"{experiment.configuration}, {experiment.split} split"]
    for c in experiment.cells:
        state = states[c.name]
        what = (f"(its lock is held by {lock_holder(c.folder)})" if state == "running"
                else f"calib_train {shlex.join(c.argv)}" + (f"  # after {c.base}" if state == WAITING else ""))
        lines.append(f"  {state:<11} {c.name:<40} {what}")
    return lines


def _summary(experiment: Experiment, result: GridResult) -> list:
    counts = {}
    for state in result.states.values():
        counts[state] = counts.get(state, 0) + 1
    ran = sum(o.state == "finished" and bool(o.mode) for o in result.outcomes)
    lines = [f"{experiment.name}: {len(result.states)} cells: "
             + ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
             + (f" ({ran} run now)" if ran else "") + f"; status: {result.status_file}"]
    if counts.get(WAITING):
        lines.append(f"{counts[WAITING]} waiting for base: confidence-head cells whose base cell has not finished "
                     "(not failures of the heads); a rerun runs them once their base cells have finished.")
    if any(state in ("failed", "interrupted", "to run", "to resume", WAITING) for state in result.states.values()):
        lines.append(f"rerun `calib_experiment {experiment.path}` to retry the cells that did not finish "
                     f"(their logs: {experiment.folder / 'logs'}).")
    if counts.get("running") or counts.get("submitted"):
        lines.append(f"cells still running or queued: rerun `calib_experiment {experiment.path}` once they end to "
                     f"collect them" + (" and evaluate." if experiment.evaluate else "."))
    return lines


def _check_options(options: GridOptions) -> None:
    if options.executor not in EXECUTORS:
        raise CalibnetError(f"unknown executor {options.executor!r}; choose {', '.join(EXECUTORS)}.")
    if not options.wait and options.executor != "slurm":
        raise CalibnetError("--no-wait applies to --executor slurm (local cells end with the command).")
    if options.executor == "slurm" and options.time_min is None:
        raise CalibnetError("--executor slurm needs --time MINUTES: the longest one cell may run.")
    if options.executor == "slurm" and not options.dry_run and shutil.which("srun") is None:
        raise CalibnetError("--executor slurm: no SLURM here (srun is not on PATH); submit from a SLURM login node, "
                            "or use --executor local or submitit-local.")


def grid_states(experiment: Experiment) -> tuple[dict, dict]:
    """({cell: state}, {cell: SLURM job id} of the cells still queued or running on SLURM). A head whose base
    cell has not finished (and that is itself neither finished nor running or queued) is ``waiting for base``."""
    states = {cell.name: cell_state(cell, experiment.folder / "logs") for cell in experiment.cells}
    queued = _queued_on_slurm(experiment, states)
    states.update({name: "submitted" for name in queued})
    for cell in experiment.cells:
        if cell.base and states[cell.base] != "finished" and states[cell.name] not in ("finished", "running",
                                                                                         "submitted"):
            states[cell.name] = WAITING
    return states, queued


def run_grid(experiment: Experiment, options: GridOptions, roots: DataRoots, log: Callable = print) -> GridResult:
    """Run every cell that is not finished (nor running elsewhere) with ``options.executor``, one progress line
    per cell to ``log``; with ``dry_run``, only say what each cell's state is. Two waves: every cell that can
    run now, then the heads whose base cell has finished meanwhile (not with ``--no-wait``: a rerun submits
    them)."""
    _check_options(options)
    states, queued = grid_states(experiment)
    if options.dry_run:
        return GridResult(states, lines=_plan_lines(experiment, states))
    _keep_logs_of_finished(experiment, states)
    todo = [cell for cell in experiment.cells if states[cell.name] not in ("finished", "running", "submitted", WAITING)]
    waiting = [cell for cell in experiment.cells if states[cell.name] == WAITING]
    status = _Status(experiment, states, options.executor)
    for name, job in queued.items():
        status.cells[name].update(job=job, executor="slurm")
    status.write()
    result = GridResult(states, status_file=status.path)
    skipped = {state: sum(s == state for s in states.values())
               for state in ("finished", "running", "submitted", WAITING)}
    log(f"{experiment.name}: {len(todo)} of {len(states)} cells to run with --executor {options.executor}"
        + (" (" + ", ".join(f"{n} {state}" for state, n in skipped.items() if n) + ")" if len(todo) < len(states)
           else ""))
    for cell in experiment.cells:
        if states[cell.name] == "running":
            log(f"{cell.name}: running elsewhere ({lock_holder(cell.folder)}), left alone")
    if waiting:
        log(f"{len(waiting)} waiting for base: " + ("a confidence-head cell runs once its base cell has finished."
                                                     if options.wait else "with --no-wait, a rerun submits a "
                                                     "confidence-head cell once its base cell has finished."))
    wave = {"size": len(todo), "done": 0}

    def report(outcome: CellOutcome) -> None:
        result.outcomes.append(outcome)
        wave["done"] += 1
        log(f"[{wave['done']}/{wave['size']}] {_describe(outcome)}")
        status.update(outcome.name, state=outcome.state, seconds=round(outcome.seconds, 1), log=outcome.log,
                      job=outcome.job, message=outcome.message)

    def submitted(job: CellJob, job_id: str) -> None:
        log(f"{job.name}: submitted as job {job_id}")
        status.update(job.name, state="submitted", job=job_id, executor=options.executor)

    _run_wave([cell_job(cell, experiment, roots) for cell in todo], experiment, options, report, log, submitted,
              result)
    if waiting and options.wait:
        now, _ = grid_states(experiment)
        later = [cell for cell in waiting if now[cell.name] not in ("finished", "running", "submitted", WAITING)]
        for cell in waiting:
            if cell not in later and now[cell.name] != WAITING:
                status.update(cell.name, state=now[cell.name])
        if later:
            log(f"{experiment.name}: {len(later)} of {len(waiting)} waiting for base to run now (their base cells "
                "have finished)")
            wave.update(size=len(later), done=0)
            _run_wave([cell_job(cell, experiment, roots) for cell in later], experiment, options, report, log,
                      submitted, result)
    result.states = status.states()
    result.lines = _summary(experiment, result)
    return result


def _run_wave(jobs: list, experiment: Experiment, options: GridOptions, report: Callable, log: Callable,
              submitted: Callable, result: GridResult) -> None:
    """Run ``jobs`` with the executor of ``options`` until they end (submitit's slurm with --no-wait: until
    they are submitted)."""
    if jobs and options.executor == "local":
        _run_local(jobs, options.jobs or 1, report, log)
    elif jobs:
        result.job_ids += _run_submitit(jobs, experiment, options, report, submitted)
