"""Writing results so that an interrupted or failed run never leaves a half-written file behind:
everything is written under a temporary name in the same folder, then renamed into place."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Iterator


def _default_mode(base: int) -> int:
    """``base`` less the process umask: what a plain open()/mkdir() would have given (mkstemp gives 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return base & ~mask


@contextlib.contextmanager
def atomic_path(path: os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same file ending, so writers that infer the format
    from it still work); it is renamed onto ``path`` when the block succeeds and removed otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".partial-", suffix=f"-{path.name}", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _default_mode(0o666))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and an atomic rename."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: os.PathLike, obj) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


@contextlib.contextmanager
def atomic_output_dir(final_dir: os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder (``.NAME.PID@HOST.XXXXXXXX.partial``); on success it replaces
    ``final_dir``, on error it is removed. Temporary folders of ``final_dir`` left by a killed process are removed
    first (:func:`remove_stale_partials`).

    With ``overwrite=False`` an existing ``final_dir`` is left untouched and ``FileExistsError`` raised
    before anything is written.
    """
    final_dir = Path(final_dir)
    if final_dir.exists() and not overwrite:
        raise FileExistsError(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(final_dir)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.{os.getpid()}@{socket.gethostname()}.",
                                    suffix=".partial", dir=final_dir.parent))
    try:
        yield tmp_dir
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    os.chmod(tmp_dir, _default_mode(0o777))
    old = None
    if final_dir.exists():
        old = final_dir.with_name(f".{final_dir.name}.old-{os.getpid()}")
        os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def process_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (zombies included)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it exists
        return True
    return True


def remove_stale_partials(final_dir: os.PathLike) -> list:
    """Remove the temporary folders of :func:`atomic_output_dir` for ``final_dir`` whose process is gone (a killed
    calib_evaluate or prediction): those written by a process of this host that no longer runs, and those named
    without a process (calibnet before 2026-12). Folders of live processes and of other hosts are kept.
    Returns the folders removed."""
    final_dir = Path(final_dir)
    pattern = re.compile(rf"\.{re.escape(final_dir.name)}\.(?:(\d+)@(.*)\.)?[a-z0-9_]{{8}}\.partial")
    host, removed = socket.gethostname(), []
    for path in final_dir.parent.glob(f".{final_dir.name}.*.partial"):
        match = pattern.fullmatch(path.name)
        if not match or not path.is_dir():
            continue
        pid, owner = match.group(1), match.group(2)
        if pid is not None and (owner != host or process_alive(int(pid))):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def file_sha256(path: os.PathLike) -> str:
    """The sha256 hex digest of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
