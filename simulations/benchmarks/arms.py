"""Benchmark arms: their working folders, their saved results (resumable grids) and their selection."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from fedtune.common.files import write_json_atomic

from .harness import RESULTS, SIMULATE, Arm, simulate_arm


def work_dir(name: str) -> Path:
    """``results/work/<name>/`` (created): the benchmark's arms' ``--out`` folders and logs."""
    path = RESULTS / "work" / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def arms_dir(name: str) -> Path:
    """``results/arms/<name>/`` (created, kept in git): one small JSON result per computed arm.

    A long grid run in parts, over sessions or machines, is assembled from these files (see
    :func:`cached`); the arms' working folders stay in :func:`work_dir`.
    """
    path = RESULTS / "arms" / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def federated_arm(
    bench: str,
    label: str,
    num_clients: int,
    run_config: Mapping[str, Any],
    timeout: float = 3 * 3600,
    entry: Sequence[str] = SIMULATE,
) -> Arm:
    """Run one ``fedtune simulate`` arm (or ``entry``) into a fresh ``results/work/<bench>/<label>/``."""
    out = work_dir(bench) / label
    shutil.rmtree(out, ignore_errors=True)  # a previous bench run's folder: start clean
    return simulate_arm(out, num_clients, dict(run_config), timeout=timeout, entry=entry)


def cached(path: Path, key: Mapping[str, Any], compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Reuse an arm's result saved at ``path`` when ``FEDTUNE_BENCH_RESUME=1`` and its ``key`` matches.

    Long benchmarks can so be run in parts (a subset of arms per invocation) and assembled by a last
    run with every arm and ``FEDTUNE_BENCH_RESUME=1``. Without the variable every arm is recomputed.
    """
    if os.environ.get("FEDTUNE_BENCH_RESUME") == "1":
        result = saved(path, key)
        if result is not None:
            return result
    result = compute()
    # atomic: a benchmark killed while saving leaves the previous file or none, never half of one
    write_json_atomic(path, {"key": _jsonable(key), "result": json.loads(json.dumps(result, default=float))})
    return result


def saved(path: Path, key: Mapping[str, Any]) -> dict[str, Any] | None:
    """The arm result saved at ``path`` by :func:`cached` if its key equals ``key``, else ``None``."""
    if not path.is_file():
        return None
    try:
        entry = json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(
            f"Saved arm {path} is not valid JSON ({err}): delete it to recompute the arm."
        ) from None
    return entry["result"] if _matches(entry.get("key"), _jsonable(key)) else None


def _matches(saved_key: Any, key: Any) -> bool:
    """Whether a saved arm's key is ``key``.

    Run-config keys added since the arm was saved count as equal when they hold their default: a new
    option left at its default does not change an arm computed before it existed.
    """
    if not (isinstance(saved_key, dict) and isinstance(key, dict) and "config" in key):
        return saved_key == key
    from fedtune.common.config import defaults

    config, saved_config = key["config"], saved_key.get("config", {})
    default = _jsonable(defaults())
    added = {k for k in config if k not in saved_config}
    if any(config[k] != default.get(k) for k in added):
        return False
    rest = {k: v for k, v in config.items() if k not in added}
    return {**saved_key, "config": saved_config} == {**key, "config": rest}


def saved_only() -> bool:
    """``FEDTUNE_BENCH_SAVED_ONLY=1``: assemble the table from saved arms only, computing nothing.

    A grid run in parts over several sessions can so be reported as it stands; the arms not saved
    yet are listed in the results.
    """
    return os.environ.get("FEDTUNE_BENCH_SAVED_ONLY") == "1"


def reuse_or_run(
    path: Path, key: Mapping[str, Any], compute: Callable[[], dict[str, Any]], missing: list[str]
) -> dict[str, Any] | None:
    """:func:`cached`; under :func:`saved_only`, the saved result only.

    An arm not saved yet (or saved under another key) is then ``None`` and its file's stem is appended
    to ``missing``, for the results to list.
    """
    if not saved_only():
        return cached(path, key, compute)
    result = saved(path, key)
    if result is None:
        missing.append(path.stem)
    return result


def _jsonable(key: Mapping[str, Any]) -> Any:
    return json.loads(json.dumps(key, default=str))


def resolved(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """Every setting an arm with these overrides runs with, defaults included (not its output folder).

    Part of a saved arm's key, so that an arm computed before a default changed is not reused.
    """
    from fedtune.common.config import key_of, parse_run_config

    full = parse_run_config(dict(run_config)).to_run_config()
    return {k: v for k, v in full.items() if k != key_of("out_dir")}


def env_list(var: str, default: Sequence[Any], cast: Callable[[str], Any] = str) -> list[Any]:
    """A comma-separated override of a benchmark's arms from the environment, else ``default``.

    Raises
    ------
    ValueError
        On a value ``cast`` rejects (names the variable).
    """
    raw = os.environ.get(var, "").strip()
    if not raw:
        return list(default)
    try:
        return [cast(x.strip()) for x in raw.split(",") if x.strip()]
    except ValueError as err:
        raise ValueError(f"${var}={raw!r}: {err}") from None


def choose(var: str, requested: Sequence[str], valid: Sequence[str]) -> list[str]:
    """Check arm names picked with ``var`` against the ``valid`` ones.

    Raises
    ------
    ValueError
        Naming the unknown arm(s) and listing the valid ones.
    """
    unknown = [x for x in requested if x not in valid]
    if unknown:
        raise ValueError(f"${var}: unknown {', '.join(unknown)}; valid: {', '.join(valid)}.")
    return list(requested)
