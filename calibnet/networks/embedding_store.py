"""Frozen-encoder embeddings kept on disk and shared by every run that uses the same encoder.

SAM-FT, CalSAM, its ablations and zero-shot SAM all freeze the image encoder, so a slice encoded for one
run (any method, seed or fold) is the same embedding for the next. The store is content-addressed: an
entry is named by the sha256 of the encoder's exact input (after the backbone's own preprocessing), inside
a folder named by the sha256 of the encoder's weights and the network's embedding layout. A different
slice, preprocessing or set of weights is therefore a different entry — a stale hit cannot happen by
construction. Each entry also carries the sha256 of its embedding's bytes: an entry that cannot be read,
has another shape or fails that check is reported, encoded again and rewritten (never used).

Entries are float16 (2 MiB per LiteMedSAM slice of 256×64×64); every embedding handed out, freshly encoded
or read, is that float16 value, so a run computes the same numbers whether the store was warm or cold.
The encoder runs as a faster inference copy (:mod:`calibnet.networks.fast_encoder`) whose output differs
from the plain float32 encoder's by float32 rounding only (max |Δ| / max |embedding| ≈ 4e-6, far inside the
1e-3 tolerated and below float16's own rounding), so the folder is still named by the original encoder's
weights and entries written before stay valid; a slice may differ from its old entry in the last float16 bit.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import torch

from calibnet.files import atomic_path, atomic_write_json

EMBEDDINGS_FOLDER = "calib_embeddings"  # inside nnUNet_preprocessed/DatasetXXX_Name/
STORE_DTYPE = torch.float16
_MANIFEST = "store.json"
# in every folder name: entries of an older format are never read (v3: the encoder in eval mode from construction
# on; before, a freshly built network encoded training slices in train mode, BatchNorm on batch statistics)
STORE_FORMAT = "v3"


def weights_digest(*parts) -> str:
    """sha256 of the state of modules (names, shapes, dtypes and values of every tensor, in order) and tensors."""
    digest = hashlib.sha256()
    for part in parts:
        state = part.state_dict() if isinstance(part, torch.nn.Module) else {"tensor": part}
        for name, tensor in state.items():
            digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}".encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def tensor_digest(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's shape, dtype and bytes."""
    data = tensor.detach().cpu().contiguous()
    return hashlib.sha256(f"{tuple(data.shape)}|{data.dtype}|".encode()
                          + data.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


class EmbeddingStore:
    """Embeddings of one encoder (its weights' digest and layout name a folder under ``root``), counting hits,
    encodes and damaged entries recomputed."""

    def __init__(self, root: os.PathLike, encoder_digest: str, layout: str, description: str = ""):
        self.folder = Path(root) / f"{layout}-{encoder_digest[:16]}-{STORE_FORMAT}"
        self.description = description
        self.shape = self._read_shape()
        self.hits = self.encoded = self.recomputed = 0

    def _read_shape(self) -> tuple | None:
        try:
            return tuple(json.loads((self.folder / _MANIFEST).read_text())["shape"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _write_manifest(self, shape: tuple) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.folder / _MANIFEST, {"encoder": self.description, "shape": list(shape),
                                                  "dtype": str(STORE_DTYPE)})
        self.shape = tuple(shape)

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.pt"

    def read(self, key: str) -> torch.Tensor | None:
        """The stored embedding of ``key``; None when absent; counts (and returns None for) a damaged entry."""
        path = self.path(key)
        if not path.exists():
            return None
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
            embedding = entry["embedding"]
            valid = (isinstance(embedding, torch.Tensor) and embedding.dtype == STORE_DTYPE
                     and (self.shape is None or tuple(embedding.shape) == self.shape)
                     and tensor_digest(embedding) == entry["sha256"])
        except Exception:  # truncated, not a torch file, not a dict: all mean "encode again"
            valid = False
        if not valid:
            self.recomputed += 1
            return None
        return embedding

    def write(self, key: str, embedding: torch.Tensor) -> None:
        if self.shape != tuple(embedding.shape):
            self._write_manifest(tuple(embedding.shape))
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as temporary:
            torch.save({"embedding": embedding, "sha256": tensor_digest(embedding)}, temporary)

    def embeddings(self, inputs: torch.Tensor, encode: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The embeddings of a batch of encoder inputs (N, ...), as float16 values in float32 on the inputs'
        device; only the inputs not in the store go through ``encode``."""
        keys = [tensor_digest(x.float()) for x in inputs]
        found = [self.read(key) for key in keys]
        missing = [i for i, embedding in enumerate(found) if embedding is None]
        if missing:
            for i, embedding in zip(missing, encode(inputs[missing])):
                found[i] = embedding.detach().to("cpu", STORE_DTYPE)
                self.write(keys[i], found[i])
        self.encoded += len(missing)
        self.hits += len(keys) - len(missing)
        return torch.stack(found).to(inputs.device, torch.float32)

    def summary(self) -> str:
        damaged = f", {self.recomputed} damaged entries encoded again" if self.recomputed else ""
        return f"embedding store {self.folder}: {self.hits} slices found, {self.encoded} encoded{damaged}"
