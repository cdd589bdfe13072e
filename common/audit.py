"""Audit records: what crossed the wire (per message, per tensor) and what each site really sent.

Both sides write the same record format, each on its own disk:

- ``wire.jsonl``: one JSON line per message: ``round``, ``node``, ``direction`` (``down`` =
  server to site, ``up`` = site to server), ``kind`` (Flower message type), ``stage`` (SecAgg+
  stage or empty), ``payload_bytes`` and ``tensors``: for every array or byte string its
  ``name``, ``shape``, ``dtype``, ``bytes`` and ``sha256``.
- ``*.npz``: arrays kept for the SecAgg check (the server's received vectors, a site's
  pre-mask vector and the global adapter it received).

The walk over a message's records is duck-typed (no Flower import): an ArrayRecord value has
``data``/``shape``/``dtype``; a ConfigRecord value is a scalar, a string, bytes or a list.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .files import TMP_SUFFIX, atomic_path, write_text_atomic
from .run_folder import GLOBAL_FINAL, WIRE_LOG

NPY_MAGIC = b"\x93NUMPY"
SECAGG_RECORD = "secaggplus_configs"  # Flower's RECORD_KEY_CONFIGS: the config record of SecAgg+ messages
_ROUND_FILE = re.compile(r"-round-(\d+)")  # received-round-003-node-7.npz, global-round-003.npz, ...


def secagg_stage(msg: Any) -> str:
    """The SecAgg+ stage a Flower message's request carries ("" outside SecAgg+, in replies, when empty)."""
    if not msg.has_content():
        return ""
    record = msg.content.get(SECAGG_RECORD)
    return str(record.get("stage", "")) if record is not None else ""


def _bytes_entry(name: str, data: bytes) -> dict[str, Any]:
    entry = {"name": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    if data.startswith(NPY_MAGIC):  # a serialised ndarray (e.g. a SecAgg+ masked vector)
        arr = np.load(io.BytesIO(data), allow_pickle=False)
        return {**entry, "shape": list(arr.shape), "dtype": str(arr.dtype)}
    return {**entry, "shape": [len(data)], "dtype": "bytes"}


def content_tensors(content: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Every array or byte string in a message content (record name . key [index])."""
    out: list[dict[str, Any]] = []
    for record_name, record in content.items():
        for key, value in record.items():
            name = f"{record_name}.{key}"
            if hasattr(value, "data") and hasattr(value, "shape"):
                data = bytes(value.data)
                arr = np.load(io.BytesIO(data), allow_pickle=False) if data.startswith(NPY_MAGIC) else None
                out.append(
                    {
                        "name": name,
                        "shape": list(arr.shape if arr is not None else value.shape),
                        "dtype": str(arr.dtype if arr is not None else value.dtype),
                        "bytes": len(data),
                        "sha256": hashlib.sha256(data).hexdigest(),
                    }
                )
            elif isinstance(value, bytes):
                out.append(_bytes_entry(name, value))
            elif isinstance(value, list) and value and isinstance(value[0], bytes):
                out.extend(_bytes_entry(f"{name}[{i}]", b) for i, b in enumerate(value))
    return out


def _value_bytes(value: object) -> int:
    if isinstance(value, bytes):
        return len(value)
    if isinstance(value, str):
        return len(value.encode())
    if isinstance(value, list):
        return sum(_value_bytes(v) for v in value)
    return 8  # int / float / bool scalar


def payload_bytes(msg: Any) -> int:
    """Bytes a Flower message's content carries: array bytes, and keys + values of config/metric records.

    0 for an error reply. Duck-typed: an array has ``data``; anything else is a scalar, str, bytes or list.
    """
    if not msg.has_content():
        return 0
    total = 0
    for record in msg.content.values():
        for key, value in record.items():
            total += len(value.data) if hasattr(value, "data") else _value_bytes(key) + _value_bytes(value)
    return total


def message_round(msg: Any) -> int:
    """The round a Flower message belongs to (its ``group_id``; 0 outside rounds)."""
    group = msg.metadata.group_id
    return int(group) if group.isdigit() else 0


def message_record(msg: Any, *, node: int, direction: str, stage: str, payload_bytes: int) -> dict[str, Any]:
    """The wire record of one Flower message (duck-typed: ``metadata``, ``content``, ``error``)."""
    has = msg.has_content()
    return {
        "round": message_round(msg),
        "node": node,
        "direction": direction,
        "kind": msg.metadata.message_type,
        "stage": stage,
        "payload_bytes": payload_bytes,
        "tensors": content_tensors(msg.content) if has else [],
        "error": msg.error.reason if msg.has_error() else "",
    }


def content_arrays(content: Mapping[str, Mapping[str, Any]]) -> list[np.ndarray]:
    """The ndarrays a message carries, in record order (ArrayRecord arrays, then npy byte strings)."""
    arrays: list[np.ndarray] = []
    for record in content.values():
        for value in record.values():
            items = value if isinstance(value, list) else [value]
            for item in items:
                data = bytes(item.data) if hasattr(item, "data") else item
                if isinstance(data, bytes) and data.startswith(NPY_MAGIC):
                    arrays.append(np.load(io.BytesIO(data), allow_pickle=False))
    return arrays


class WireLog:
    """Append-only ``wire.jsonl`` (one line per message, flushed, so a crash loses no earlier line)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, record: dict[str, Any]) -> None:
        """Write one record as a JSON line."""
        with self.path.open("a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")

    def read(self) -> Iterator[dict[str, Any]]:
        """The records written so far."""
        return (record for _, record in self.numbered())

    def numbered(self) -> Iterator[tuple[int, dict[str, Any]]]:
        """``(line number, record)`` of the records written so far.

        Raises
        ------
        ValueError
            A line that is not a JSON object (names the file and line).
        """
        if not self.path.exists():
            return
        with self.path.open() as f:
            for line_no, line in enumerate(f, 1):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(
                        f"{self.path}, line {line_no}: not a JSON wire record ({err.msg})."
                    ) from None
                if not isinstance(record, dict):
                    raise ValueError(f"{self.path}, line {line_no}: not a JSON wire record (no object).")
                yield line_no, record


def save_arrays(path: Path, arrays: list[np.ndarray], **scalars: float | int) -> None:
    """Write ``arrays`` (as ``a0, a1, ...``) and named scalars to ``path`` (.npz) atomically."""
    with atomic_path(path, suffix=".npz") as tmp:  # numpy.savez would add .npz to a name without it
        np.savez(
            tmp,
            **{f"a{i}": a for i, a in enumerate(arrays)},
            **{k: np.asarray(v) for k, v in scalars.items()},
        )


def load_arrays(path: Path) -> tuple[list[np.ndarray], dict[str, float | int]]:
    """Inverse of :func:`save_arrays`: ``(arrays, scalars)``."""
    with np.load(path, allow_pickle=False) as z:
        keys = [k for k in z.files if k.startswith("a") and k[1:].isdigit()]
        arrays = [z[k] for k in sorted(keys, key=lambda k: int(k[1:]))]
        scalars = {k: z[k].item() for k in z.files if k not in keys}  # ints stay exact (64-bit node ids)
    return arrays, scalars


def trim_audit(audit_dir: Path, after_round: int) -> None:
    """Drop what ``audit_dir`` holds of the rounds after ``after_round``: a resumed run redoes them.

    Every ``wire.jsonl`` below it keeps its records up to ``after_round`` (and loses a last line a
    crash cut short); ``*.npz`` files of later rounds, ``global-final.npz`` and temp files go.
    """
    for wire in sorted(Path(audit_dir).rglob(WIRE_LOG)):
        kept = []
        for line in wire.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # cut short by the crash
            if int(record.get("round", 0)) <= after_round:
                kept.append(line + "\n")
        write_text_atomic(wire, "".join(kept))
    for npz in sorted(Path(audit_dir).rglob("*.npz")):
        match = _ROUND_FILE.search(npz.name)
        later = match is not None and int(match.group(1)) > after_round
        if later or npz.name == GLOBAL_FINAL or npz.name.endswith(TMP_SUFFIX + ".npz"):
            npz.unlink()
