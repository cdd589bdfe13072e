"""Atomic writes: a reader sees the previous file or folder or the new one, never half of one.

Every file a run, a benchmark or a deployment writes goes through these helpers: the content is
written to a temp sibling (``NAME.tmp``) and renamed over the target, which POSIX makes atomic.
A folder is swapped in with two renames (:func:`replace_dir`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TMP_SUFFIX = ".tmp"
OLD_SUFFIX = ".old"


def temp_sibling(path: Path, suffix: str = "") -> Path:
    """``path`` with ``.tmp`` (and ``suffix``, for writers that insist on one) appended to its name."""
    return path.with_name(path.name + TMP_SUFFIX + suffix)


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temp path to write; on success rename it over ``path`` (creating the parent folder).

    On failure the temp file is removed and ``path`` keeps its previous content. ``suffix`` is
    appended to the temp name for writers that add their own (``numpy.savez`` adds ``.npz``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path, suffix)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | Path, obj: Any, indent: int = 2) -> None:
    """Write ``obj`` as JSON (with a final newline) to ``path`` atomically."""
    write_text_atomic(path, json.dumps(obj, indent=indent) + "\n")


def previous_dir(folder: Path) -> Path:
    """Where :func:`replace_dir` keeps the previous content of ``folder`` while it swaps."""
    return folder.with_name(folder.name + OLD_SUFFIX)


def fresh_temp_dir(folder: Path) -> Path:
    """An empty temp sibling of ``folder`` to fill and then swap in with :func:`replace_dir`."""
    tmp = temp_sibling(Path(folder))
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def replace_dir(tmp: Path, folder: Path) -> None:
    """Swap the complete folder ``tmp`` in as ``folder`` with two renames.

    At every instant either ``folder`` or :func:`previous_dir` holds a complete copy (the new or
    the previous one): a crash between the two renames leaves the previous content in
    ``folder.old``, which is removed only once the new one is in place.
    """
    old = previous_dir(folder)
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/fedtune/models`` (``~/.cache/fedtune/models`` when unset)."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "fedtune" / "models"
