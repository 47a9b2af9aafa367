"""Reading torch checkpoints without running code from them.

Every checkpoint calibnet reads goes through :func:`load_checkpoint`: ``torch.load(..., weights_only=True)``,
with the only non-tensor objects nnU-Net's checkpoints hold (numpy scalars such as ``_best_ema`` and their dtype)
allowed by name for that one call; nnU-Net's own load (resuming a training) runs inside
:func:`weights_only_loads`, which makes it weights-only too. A pickle asking for anything else (``os.system``, a class of its own, ...) is
refused with one message naming the file, before any of it runs: results folders are shared between people.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import re
from typing import Iterator

import numpy as np
import torch

from calibnet.errors import CalibnetError

_numpy_core = getattr(np, "_core", None) or np.core
_SCALAR_TYPES = (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
                 np.float16, np.float32, np.float64)
# the numpy objects in nnU-Net's checkpoints: numeric scalars (under the names numpy 1 and numpy 2 pickle them
# with), their dtype and its class; no arrays, no other classes
SAFE_GLOBALS = [(_numpy_core.multiarray.scalar, "numpy._core.multiarray.scalar"),
                (_numpy_core.multiarray.scalar, "numpy.core.multiarray.scalar"), np.dtype,
                *(type(np.dtype(t)) for t in _SCALAR_TYPES)]
_FORCE, _FORCE_NO = "TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


class UnsafeCheckpointError(CalibnetError):
    """A checkpoint whose pickle asks for objects beyond weights and plain values: it is not loaded."""


def _refused_object(message: str) -> str | None:
    """The object a weights-only load refused, from torch's message; None for another failure (e.g. "Unsupported
    operand": a file that is no torch checkpoint, for the caller to name)."""
    found = re.search(r"GLOBAL ([\w.]+)|but got <class '([\w.]+)'>", message)
    return (found.group(1) or found.group(2)) if found else None


@contextlib.contextmanager
def weights_only_loads(path: os.PathLike) -> Iterator[None]:
    """Within the block every ``torch.load`` reads weights only, with SAFE_GLOBALS, even one that asks for
    ``weights_only=False`` (nnU-Net's own, through torch's TORCH_FORCE_WEIGHTS_ONLY_LOAD); a pickle asking for
    other objects raises :class:`UnsafeCheckpointError` naming ``path``."""
    saved = {name: os.environ.pop(name, None) for name in (_FORCE, _FORCE_NO)}
    os.environ[_FORCE] = "1"
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            yield
    except pickle.UnpicklingError as e:
        refused = _refused_object(str(e))
        if refused is None:
            raise
        raise UnsafeCheckpointError(
            f"{path} contains objects calibnet will not unpickle ({refused}): loading them could run code. Use only "
            f"checkpoints written by calib_train; retrain the run (calib_train ... --overwrite) or get its checkpoint "
            f"again from whoever trained it.") from None
    finally:
        for name, value in saved.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value


def load_checkpoint(path: os.PathLike, map_location="cpu"):
    """The contents of the torch checkpoint ``path``, read with ``weights_only=True``. Raises
    :class:`UnsafeCheckpointError` for a pickle asking for other objects; other read errors (a truncated or
    foreign file) propagate as torch raises them, for the caller to name."""
    with weights_only_loads(path):
        return torch.load(path, map_location=map_location, weights_only=True)
