"""What happens when calib_train is stopped: SIGTERM stops it as Ctrl-C does (nnU-Net's data-augmentation workers
are shut down, the run's lock released, an unfinished ``--overwrite`` removed), and the worker processes forked
while training die with their parent even when it is killed outright (SIGKILL), through Linux's parent-death
signal (``prctl(PR_SET_PDEATHSIG)``), set in each child right after the fork.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading

PR_SET_PDEATHSIG = 1
_forks = {"training": False, "parent": None, "registered": False}  # read in the forked child (a copy)


@contextlib.contextmanager
def stop_on_sigterm():
    """In the block, SIGTERM raises KeyboardInterrupt in the main thread (once), so that every ``finally`` runs; the
    process then ends by SIGTERM as it was asked to (status -15 / 143), not with an error of its own. Elsewhere
    than in the main thread, nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []

    def handler(signum, frame):
        if not received:
            received.append(signum)
            raise KeyboardInterrupt("stopped by SIGTERM")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        if received:
            os.kill(os.getpid(), signal.SIGTERM)


def _die_with_parent() -> None:
    """In a child forked while training: die (SIGKILL) when the training process dies; SIGTERM back to its
    default (the child must not run the parent's handler)."""
    if not _forks["training"]:
        return
    with contextlib.suppress(ValueError, OSError):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != _forks["parent"]:  # the parent died before the signal was set up
        os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def workers_die_with_parent():
    """Processes forked in the block (nnU-Net's data-augmentation workers) are killed when this process dies
    (Linux; elsewhere nothing changes)."""
    if not sys.platform.startswith("linux"):
        yield
        return
    if not _forks["registered"]:
        os.register_at_fork(after_in_child=_die_with_parent)
        _forks["registered"] = True
    before = dict(_forks)
    _forks.update(training=True, parent=os.getpid())
    try:
        yield
    finally:
        _forks.update(training=before["training"], parent=before["parent"])
