"""Adapter state <-> the arrays that travel, sizes, fingerprints, and the shared-adapter writer.

Only ``get_peft_model_state_dict`` ever leaves a site: the PEFT parameters plus the
classifier head peft saves for sequence classification. The arrays travel in the
sorted order of their names; :func:`adapter_names` is that order.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict

from .files import fresh_temp_dir, replace_dir
from .run_folder import ADAPTER_METADATA


def _projected_prefix(model: PeftModel) -> bool:
    """Prefix tuning with peft's MLP reparametrisation (``prefix-projection``), while it trains."""
    config = model.peft_config[model.active_adapter]
    return bool(getattr(config, "prefix_projection", False)) and not config.inference_mode


def _exchanged_state(model: PeftModel) -> dict[str, torch.Tensor]:
    """The PEFT state that travels: all of it, less LoRA's A matrices when they are frozen (FFA-LoRA).

    A frozen A stays at the seeded initialisation every site and the coordinator share, so sending it
    would only double the upload; the shared adapter written at the end still holds it. Under
    ``prefix-projection`` peft's state dict holds the prefix the MLP computes, not the MLP, so the
    trainable parameters themselves (prefix embedding, MLP, head) travel; the adapter written at
    the end holds the computed prefix, as peft saves it.
    """
    if _projected_prefix(model):
        return {n: p for n, p in model.named_parameters() if p.requires_grad}
    state = get_peft_model_state_dict(model)
    a_frozen = any("lora_A" in n for n, _ in model.named_parameters()) and not any(
        p.requires_grad for n, p in model.named_parameters() if "lora_A" in n
    )
    return {k: v for k, v in state.items() if not (a_frozen and "lora_A" in k)}


def frozen_adapter_fingerprint(model: PeftModel) -> str:
    """SHA-256 of the PEFT tensors that are frozen and never sent (FFA-LoRA's A); ``""`` when none are.

    Every site must hold the coordinator's A for the averaged B to mean anything: the coordinator sends
    this fingerprint and a site refuses to train on a mismatch (e.g. another torch version's init).
    """
    frozen = [p.detach().float().cpu().numpy() for n, p in sorted(model.named_parameters()) if "lora_A" in n]
    if not frozen or any(p.requires_grad for n, p in model.named_parameters() if "lora_A" in n):
        return ""
    return arrays_fingerprint(frozen)


def adapter_names(model: PeftModel) -> list[str]:
    """Names of the exchanged tensors, in wire order."""
    return sorted(_exchanged_state(model))


def get_adapter_arrays(model: PeftModel) -> list[np.ndarray]:
    """The exchanged PEFT state as float32 numpy arrays in wire order (copies)."""
    state = _exchanged_state(model)
    return [state[k].detach().float().cpu().numpy().copy() for k in sorted(state)]


def set_adapter_arrays(model: PeftModel, arrays: list[np.ndarray]) -> None:
    """Load wire-order arrays into ``model``'s PEFT state.

    Raises
    ------
    ValueError
        On a wrong tensor count, or a tensor whose shape or values are wrong (names the tensor).
    """
    state = _exchanged_state(model)
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
    if _projected_prefix(model):
        with torch.no_grad():
            for name, value in new_state.items():
                state[name].copy_(value)
        return
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


def write_adapter_files(model: PeftModel, folder: Path, metadata: dict[str, Any]) -> None:
    """Write the adapter in PEFT's own format plus ``fedtune.json`` into ``folder`` (not atomic)."""
    model.save_pretrained(folder)
    meta = {**metadata, "adapter_fingerprint": arrays_fingerprint(get_adapter_arrays(model))}
    (Path(folder) / ADAPTER_METADATA).write_text(json.dumps(meta, indent=2) + "\n")


def save_shared_adapter(model: PeftModel, out_dir: Path, metadata: dict[str, Any]) -> Path:
    """Write the adapter in PEFT's own format plus ``fedtune.json``, atomically.

    ``out_dir`` ends up holding ``adapter_config.json``, ``adapter_model.safetensors`` and
    ``fedtune.json``; it is written to a sibling temp folder first and swapped in
    (:func:`fedtune.common.files.replace_dir`), so a crash never leaves a half-written adapter in
    place of a good one.

    Returns
    -------
    Path
        ``out_dir``.
    """
    out_dir = Path(out_dir)
    tmp = fresh_temp_dir(out_dir)
    write_adapter_files(model, tmp, metadata)
    replace_dir(tmp, out_dir)
    return out_dir
