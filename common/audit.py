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
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

NPY_MAGIC = b"\x93NUMPY"


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
                        "shape": list(value.shape),
                        "dtype": str(arr.dtype) if arr is not None else str(value.dtype),
                        "bytes": len(data),
                        "sha256": hashlib.sha256(data).hexdigest(),
                    }
                )
            elif isinstance(value, bytes):
                out.append(_bytes_entry(name, value))
            elif isinstance(value, list) and value and isinstance(value[0], bytes):
                out.extend(_bytes_entry(f"{name}[{i}]", b) for i, b in enumerate(value))
    return out


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
        if not self.path.exists():
            return
        with self.path.open() as f:
            for line_no, line in enumerate(f, 1):
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(
                        f"{self.path}, line {line_no}: not a JSON wire record ({err.msg})."
                    ) from None


def save_arrays(path: Path, arrays: list[np.ndarray], **scalars: float) -> None:
    """Write ``arrays`` (as ``a0, a1, ...``) and named scalars to ``path`` (.npz) atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(
        tmp, **{f"a{i}": a for i, a in enumerate(arrays)}, **{k: np.asarray(v) for k, v in scalars.items()}
    )
    os.replace(tmp, path)


def load_arrays(path: Path) -> tuple[list[np.ndarray], dict[str, float]]:
    """Inverse of :func:`save_arrays`: ``(arrays, scalars)``."""
    with np.load(path, allow_pickle=False) as z:
        keys = [k for k in z.files if k.startswith("a") and k[1:].isdigit()]
        arrays = [z[k] for k in sorted(keys, key=lambda k: int(k[1:]))]
        scalars = {k: float(z[k]) for k in z.files if k not in keys}
    return arrays, scalars


def site_dir(audit_dir: Path, site: str) -> Path:
    """A site's own audit folder (in simulation under the run's ``audit/sites``)."""
    return Path(audit_dir) / "sites" / f"site-{site}"
