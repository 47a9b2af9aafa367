"""One process at a time in a run folder: calib_train (training, then prediction, or ``--predict-only``) holds the
run's lock, ``.<run folder name>.lock`` beside the run folder (``calibnet.runs.busy_lock_path``), from its first
look at the folder to its last write.

The lock is an exclusive ``flock`` on that file, which the kernel releases when its holder ends in any way
(SIGKILL included), and the file names its holder as one line of JSON (pid, host, process start time, command,
since when). A second process is refused with a message naming the holder's pid. A lock file whose holder has
ended (its flock is free and no live process of this host with that pid and start time holds it) is stale: it is
taken over with a one-line note. Where the file system has no flock, the pid check alone decides. The holder
removes the file when it is done.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from datetime import datetime, timezone
from pathlib import Path

from calibnet.errors import CalibnetError
from calibnet.files import process_alive
from calibnet.runs import busy_lock_path


class RunBusyError(CalibnetError):
    """Another live process trains or predicts in the run."""


def _process_stat(pid: int) -> list:
    """The fields of /proc/PID/stat after the command name (state first; start time at index 19); [] where it
    cannot be read (no such process, not Linux)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def _alive(holder: dict) -> bool:
    """Whether the process a lock file names still runs: a process of this host with its pid (not a zombie) and,
    where recorded, its start time (so that a later process given the same pid is not taken for it)."""
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid == os.getpid() or holder.get("host") != socket.gethostname():
        return False
    if not process_alive(pid):
        return False
    stat = _process_stat(pid)
    if stat and stat[0] in ("Z", "X"):
        return False
    return not (stat and holder.get("start") and stat[19] != holder["start"])


def holder_line(pid: int | None = None, command: str = "calib_train") -> str:
    """The JSON line a holder writes into the lock file (``pid``: this process)."""
    pid = os.getpid() if pid is None else pid
    stat = _process_stat(pid)
    return json.dumps({"pid": pid, "host": socket.gethostname(), "start": stat[19] if stat else None,
                       "command": command, "since": datetime.now(timezone.utc).isoformat(timespec="seconds")})


def _read_holder(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 65536).decode(errors="replace").strip()
    if not text:
        return {}
    try:
        holder = json.loads(text)
    except ValueError:
        holder = None
    return holder if isinstance(holder, dict) else {"unreadable": text[:80]}


def _busy_message(folder: Path, holder: dict) -> str:
    who = f"process {holder.get('pid')} ({holder.get('command', 'calibnet')} on {holder.get('host')}, since " \
          f"{holder.get('since')})" if holder.get("pid") else "another process"
    return (f"{folder} is in use: {who} trains or predicts in it, and a run takes one at a time; wait for it to end "
            f"or stop it, then run this again.")


def _open_locked(path: Path, folder: Path, grace_s: float = 60.0) -> int:
    """A descriptor of the lock file holding its flock (refused when another process holds it).

    A holder's forked children (nnU-Net's augmentation workers) inherit the locked descriptor and die a moment
    after a SIGKILLed holder (PR_SET_PDEATHSIG): while the flock is held but the named holder of this host has
    ended, wait up to ``grace_s`` for them before refusing."""
    deadline = time.monotonic() + grace_s
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            if holder.get("pid") and holder.get("host") == socket.gethostname() and not _alive(holder) \
                    and time.monotonic() < deadline:
                time.sleep(0.5)
                continue
            raise RunBusyError(_busy_message(folder, holder)) from None
        except OSError:  # a file system without flock: the pid check decides alone
            pass
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        os.close(fd)  # its holder removed the file meanwhile: lock the new one


@contextlib.contextmanager
def run_lock(folder: Path, log=print, command: str = "calib_train"):
    """Hold the lock of the run in ``folder`` (which need not exist) for the block; refuse (RunBusyError) while a
    live process holds it; take over, with a note, a lock left by a process that has ended."""
    folder = Path(folder)
    path = busy_lock_path(folder)
    created = [p for p in (path.parent, *path.parent.parents) if not p.exists()]  # removed again if left empty
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = _open_locked(path, folder)
    except BaseException:
        _remove_empty(created)
        raise
    try:
        holder = _read_holder(fd)
        if holder and _alive(holder):
            raise RunBusyError(_busy_message(folder, holder))
        if holder:
            who = f"process {holder['pid']} on {holder.get('host')}" if holder.get("pid") else "a process"
            log(f"note: {path.name} was left by {who}, which has ended (killed?); taking the lock over")
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (holder_line(command=command) + "\n").encode())
    except BaseException:
        os.close(fd)
        _remove_empty(created)
        raise
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                os.unlink(path)
        os.close(fd)
        _remove_empty(created)


def _remove_empty(folders: list) -> None:
    """Remove the folders the lock created where nothing else was written into them (deepest first)."""
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()
