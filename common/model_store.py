"""Where a site finds the pinned base model, and how one is shipped to a site that lacks it.

A site looks for the base model with the coordinator's fingerprint, in this order: its own folder
(node config ``base-model``), its model cache (``<model-cache-dir>/<fingerprint>/``), the packaged
all-MiniLM-L6-v2. A site never opens a path the coordinator sends.

A site that lacks it receives it from the coordinator (see ``fedtune.server.distribution``):

1. the checkpoint tensors, in sorted name order, form one byte stream, cut into chunks of at most
   ``chunk_bytes`` (:func:`plan_transfer`); a chunk holds byte slices of one or more tensors, so a
   tensor larger than a chunk spans several messages;
2. the site writes each chunk to ``<model-cache-dir>/<fingerprint>.partial-<node>/`` on disk
   (write-then-rename: every message may run in a fresh ClientApp process, and a crash leaves no
   half-written chunk); a transfer that broke off resumes from the chunks already there;
3. the last message carries the tensor table and the config/tokenizer files with their SHA-256;
   the site assembles the tensors, refuses them unless :func:`~fedtune.common.model.hash_tensors`
   equals the pinned fingerprint (naming both), and moves the folder to
   ``<model-cache-dir>/<fingerprint>/`` in one rename.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from safetensors.numpy import load_file, save_file

from . import packaged_llm
from .base_files import (
    FingerprintMismatchError,
    fingerprint,
    packaged_model_dir,
    remember_fingerprint,
    resolve_model_dir,
    verify_fingerprint,
    weight_files,
)
from .files import atomic_path, write_text_atomic

if TYPE_CHECKING:
    import torch

PLAN = "plan.json"
# names of the records in the distribution messages (both sides)
RECORD = "fedtune.base-model"  # the request's (and the reply's) config record: `op`, fingerprint, ...
CHUNK_RECORD = "fedtune.base-model.chunk"  # a chunk's tensor bytes (uint8), keyed `name@start`
FILES_RECORD = "fedtune.base-model.files"  # the commit's config/tokenizer files, keyed by relative path


def find_base_model(expected: str, explicit: str | None, cache_dir: Path) -> Path | None:
    """The local folder of the base model with fingerprint ``expected``; ``None`` when the site lacks it.

    Parameters
    ----------
    expected
        The fingerprint the coordinator pinned.
    explicit
        The site's own model folder (node config ``base-model``), if it names one: then only it counts.
    cache_dir
        The site's model cache (node config ``model-cache-dir``).

    Raises
    ------
    FingerprintMismatchError
        When the site's own folder, or the cached copy, holds other weights (both fingerprints named).
    """
    if explicit:
        path = resolve_model_dir(explicit)
        verify_fingerprint(path, expected)
        return path
    cached = cache_dir / expected
    if (cached / "config.json").is_file():
        verify_fingerprint(cached, expected)
        return cached
    packaged = [cache_dir / packaged_llm.NAME]  # the packaged SmolLM2, if this site fetched it
    with contextlib.suppress(FileNotFoundError):
        packaged.append(packaged_model_dir())
    for folder in packaged:
        if (folder / "config.json").is_file() and fingerprint(folder) == expected:
            return folder
    return None


# --- the transfer plan ----------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorEntry:
    """One checkpoint tensor: where its bytes sit in the stream, and how to rebuild it."""

    name: str
    dtype: str  # torch dtype name, e.g. "float32"
    shape: tuple[int, ...]
    start: int  # offset of its first byte in the stream
    nbytes: int


@dataclass(frozen=True)
class Slice:
    """Bytes ``[start, end)`` of tensor ``name`` (offsets within that tensor)."""

    name: str
    start: int
    end: int

    @property
    def key(self) -> str:
        """Key of the slice's bytes in a chunk (``name@start``)."""
        return f"{self.name}@{self.start}"


@dataclass(frozen=True)
class TransferPlan:
    """The tensor table and the chunks (lists of slices) of one base model at one chunk size."""

    table: tuple[TensorEntry, ...]
    chunks: tuple[tuple[Slice, ...], ...]
    chunk_bytes: int

    @property
    def total_bytes(self) -> int:
        """Bytes of all tensors (what the chunks carry)."""
        return sum(e.nbytes for e in self.table)

    def table_json(self) -> str:
        """The tensor table as JSON (sent with the commit message)."""
        return json.dumps([[e.name, e.dtype, list(e.shape), e.nbytes] for e in self.table])


def plan_transfer(tensors: dict[str, torch.Tensor], chunk_bytes: int) -> TransferPlan:
    """Cut the tensors' byte stream (sorted names) into chunks of at most ``chunk_bytes``.

    Raises
    ------
    ValueError
        When ``chunk_bytes`` < 1.
    """
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}.")
    table, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name]
        n = t.numel() * t.element_size()
        table.append(TensorEntry(name, str(t.dtype).removeprefix("torch."), tuple(t.shape), offset, n))
        offset += n
    chunks: list[tuple[Slice, ...]] = []
    for lo in range(0, offset, chunk_bytes):
        hi = min(lo + chunk_bytes, offset)
        chunks.append(
            tuple(
                Slice(e.name, max(lo, e.start) - e.start, min(hi, e.start + e.nbytes) - e.start)
                for e in table
                if e.start < hi and e.start + e.nbytes > lo
            )
        )
    return TransferPlan(table=tuple(table), chunks=tuple(chunks), chunk_bytes=chunk_bytes)


def tensor_bytes(t: torch.Tensor) -> np.ndarray:
    """A tensor's raw bytes as a flat ``uint8`` array (any dtype, bfloat16 included)."""
    import torch

    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def model_files(model_dir: Path) -> dict[str, bytes]:
    """Every file of the model folder except the weights (config, tokenizer, ...), by relative path."""
    weights = set(weight_files(model_dir))
    return {
        p.relative_to(model_dir).as_posix(): p.read_bytes()
        for p in sorted(model_dir.rglob("*"))
        if p.is_file() and p not in weights and not p.name.startswith(".")
    }


def sha256(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Outgoing:
    """What the coordinator sends: the plan, the tensors, the other files (read once per transfer)."""

    fingerprint: str
    plan: TransferPlan
    tensors: dict[str, torch.Tensor]
    files: dict[str, bytes]

    @classmethod
    def read(cls, model_dir: Path, chunk_bytes: int) -> Outgoing:
        """Read the coordinator's base model from ``model_dir``."""
        from .model import checkpoint_tensors, hash_tensors

        tensors = checkpoint_tensors(model_dir)
        return cls(
            hash_tensors(tensors), plan_transfer(tensors, chunk_bytes), tensors, model_files(model_dir)
        )

    def chunk_arrays(self, index: int) -> dict[str, np.ndarray]:
        """``{slice key: uint8 bytes}`` of chunk ``index``."""
        return {s.key: tensor_bytes(self.tensors[s.name])[s.start : s.end] for s in self.plan.chunks[index]}


# --- the receiving site ---------------------------------------------------------------------------
class IncomingModel:
    """A base model being received into ``<cache_dir>/<fingerprint>.partial-<node>/``.

    Every method reads its state from disk: each message may be handled by a fresh process.
    """

    def __init__(self, cache_dir: Path, expected: str, node: int | str) -> None:
        self.cache_dir = Path(cache_dir)
        self.expected = expected
        self.folder = self.cache_dir / f"{expected}.partial-{node}"
        self.final = self.cache_dir / expected

    def _chunk_path(self, index: int) -> Path:
        return self.folder / f"chunk-{index:05d}.safetensors"

    def received(self, chunk_bytes: int) -> list[int]:
        """Chunks already on disk for this chunk size (a different size starts afresh)."""
        plan = self.folder / PLAN
        if not plan.is_file() or json.loads(plan.read_text())["chunk_bytes"] != chunk_bytes:
            return []
        num_chunks = json.loads(plan.read_text())["chunks"]
        return [i for i in range(num_chunks) if self._chunk_path(i).is_file()]

    def write_chunk(
        self, index: int, num_chunks: int, chunk_bytes: int, arrays: dict[str, np.ndarray]
    ) -> None:
        """Store chunk ``index`` of ``num_chunks`` (atomically; a new chunk size clears older chunks)."""
        plan = {"chunk_bytes": chunk_bytes, "chunks": num_chunks}
        plan_path = self.folder / PLAN
        if plan_path.is_file() and json.loads(plan_path.read_text()) != plan:
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        write_text_atomic(plan_path, json.dumps(plan))
        with atomic_path(self._chunk_path(index)) as tmp:
            save_file({k: np.ascontiguousarray(v, dtype=np.uint8) for k, v in arrays.items()}, str(tmp))

    def commit(self, table_json: str, files: dict[str, bytes], file_hashes: dict[str, str]) -> Path:
        """Assemble, verify and install the received model; return its cache folder.

        Raises
        ------
        FingerprintMismatchError
            When the assembled tensors do not hash to the pinned fingerprint (the partial folder is
            deleted; both fingerprints are named).
        ValueError
            When chunks are missing, a tensor's bytes are incomplete or its dtype is not one of torch's,
            a file's SHA-256 differs from the coordinator's, or a file path would leave the model folder.
        """
        plan = self.folder / PLAN
        num_chunks = json.loads(plan.read_text())["chunks"] if plan.is_file() else 0
        missing = [i for i in range(num_chunks) if not self._chunk_path(i).is_file()]
        if not num_chunks or missing:
            raise ValueError(
                f"Base model transfer to {self.folder} is incomplete: missing chunks {missing or 'all'}."
            )
        import torch
        from safetensors.torch import save_file as save_tensors

        from .model import hash_tensors

        parts: dict[str, dict[int, np.ndarray]] = {}
        for i in range(num_chunks):
            for key, value in load_file(str(self._chunk_path(i))).items():
                name, _, start = key.rpartition("@")
                parts.setdefault(name, {})[int(start)] = value
        tensors = {}
        for name, dtype, shape, nbytes in json.loads(table_json):
            pieces = parts.get(name, {})
            raw = np.concatenate([pieces[s] for s in sorted(pieces)]) if pieces else np.zeros(0, np.uint8)
            if raw.size != nbytes:
                raise ValueError(f"Base model tensor `{name}` arrived with {raw.size} of {nbytes} bytes.")
            flat = torch.frombuffer(bytearray(raw.tobytes()), dtype=_torch_dtype(name, dtype))
            tensors[name] = flat.reshape(shape)
        got = hash_tensors(tensors)
        if got != self.expected:
            shutil.rmtree(self.folder, ignore_errors=True)
            raise FingerprintMismatchError(
                f"The base model received from the coordinator hashes to {got}, but the coordinator pinned "
                f"{self.expected}: refused and deleted the received copy."
            )
        staging = self.folder / "model"
        shutil.rmtree(staging, ignore_errors=True)
        for rel, data in files.items():
            target = (staging / rel).resolve()
            if not target.is_relative_to(staging.resolve()):
                raise ValueError(f"Base model file path {rel!r} leaves the model folder: refused.")
            if sha256(data) != file_hashes.get(rel):
                raise ValueError(
                    f"Base model file {rel!r} arrived with SHA-256 {sha256(data)}, "
                    f"the coordinator sent {file_hashes.get(rel)}: refused."
                )
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        save_tensors(tensors, staging / "model.safetensors")
        self.final.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(staging, self.final)
            remember_fingerprint(self.final, got)  # the weights just hashed: no second hash at first use
        except OSError:
            if not (self.final / "config.json").is_file():  # not another node's finished copy: a real error
                raise
            verify_fingerprint(self.final, self.expected)
        shutil.rmtree(self.folder, ignore_errors=True)
        return self.final


def _torch_dtype(tensor: str, name: str) -> torch.dtype:
    """The torch dtype called ``name`` (e.g. ``"bfloat16"``) of the received ``tensor``.

    Raises
    ------
    ValueError
        When ``name`` is not a torch dtype (names the tensor and the value).
    """
    import torch

    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(
            f"Base model tensor `{tensor}` has dtype {name!r}, which is not a torch dtype: the coordinator "
            "and this site must run compatible torch versions."
        )
    return dtype
