"""Adapter state <-> the arrays that travel, sizes, fingerprints, and the shared-adapter writer.

Only ``get_peft_model_state_dict`` ever leaves a site: the PEFT parameters plus the
classifier head peft saves for sequence classification. The arrays travel in the
sorted order of their names; :func:`adapter_names` is that order.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict

FEDTUNE_METADATA = "fedtune.json"


def adapter_names(model: PeftModel) -> list[str]:
    """Names of the exchanged tensors, in wire order."""
    return sorted(get_peft_model_state_dict(model))


def get_adapter_arrays(model: PeftModel) -> list[np.ndarray]:
    """The PEFT state as float32 numpy arrays in wire order (copies)."""
    state = get_peft_model_state_dict(model)
    return [state[k].detach().float().cpu().numpy().copy() for k in sorted(state)]


def set_adapter_arrays(model: PeftModel, arrays: list[np.ndarray]) -> None:
    """Load wire-order arrays into ``model``'s PEFT state.

    Raises
    ------
    ValueError
        On a wrong tensor count, or a tensor whose shape or values are wrong (names the tensor).
    """
    state = get_peft_model_state_dict(model)
    names = sorted(state)
    if len(arrays) != len(names):
        raise ValueError(f"Adapter has {len(names)} tensors ({names[:3]}...), received {len(arrays)}.")
    new_state: dict[str, torch.Tensor] = {}
    for name, arr in zip(names, arrays, strict=True):
        ref = state[name]
        if tuple(arr.shape) != tuple(ref.shape):
            raise ValueError(
                f"Adapter tensor `{name}` has shape {tuple(ref.shape)}, received {tuple(arr.shape)}."
            )
        if not np.isfinite(arr).all():
            raise ValueError(f"Adapter tensor `{name}` received non-finite values (NaN/Inf).")
        new_state[name] = torch.from_numpy(np.asarray(arr, dtype=np.float32)).to(ref.dtype)
    set_peft_model_state_dict(model, new_state)


def nbytes(arrays: list[np.ndarray]) -> int:
    """Total bytes of ``arrays`` as stored (dtype size x elements)."""
    return int(sum(a.nbytes for a in arrays))


def arrays_fingerprint(arrays: list[np.ndarray]) -> str:
    """SHA-256 over dtype, shape and bytes of each array, in order."""
    digest = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        digest.update(f"{a.dtype}|{a.shape}|".encode())
        digest.update(a.tobytes())
    return digest.hexdigest()


def save_shared_adapter(model: PeftModel, out_dir: Path, metadata: dict[str, Any]) -> Path:
    """Write the adapter in PEFT's own format plus ``fedtune.json``, atomically.

    ``out_dir`` ends up holding ``adapter_config.json``, ``adapter_model.safetensors`` and
    ``fedtune.json``; it is written to a sibling temp folder first and swapped in, so a crash
    never leaves a half-written adapter in place of a good one.

    Returns
    -------
    Path
        ``out_dir``.
    """
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    meta = {**metadata, "adapter_fingerprint": arrays_fingerprint(get_adapter_arrays(model))}
    (tmp / FEDTUNE_METADATA).write_text(json.dumps(meta, indent=2) + "\n")
    old = out_dir.with_name(out_dir.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return out_dir
