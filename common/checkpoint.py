"""The coordinator's checkpoint: everything a killed run needs to continue, written atomically.

After every round ``OUT/checkpoint/`` holds

- ``adapter_config.json``, ``adapter_model.safetensors``, ``fedtune.json``: the shared adapter in
  PEFT's own format (loadable as is, like ``OUT/adapter/``);
- ``server_state.safetensors``: the global adapter arrays in wire order and the strategy's
  optimiser state (FedAdam's ``current_weights``, ``m_t``, ``v_t``), each at the dtype it had in
  memory, so a resumed run takes exactly the step the killed one would have taken;
- ``state.json``: the round, the ``metrics.json`` records so far, the privacy accountant's
  state, the coordinator's random-generator states and the base-model fingerprint.

The folder is written as ``checkpoint.tmp`` and swapped in with two renames
(:func:`fedtune.common.files.replace_dir`): a crash at any instant leaves a complete previous
checkpoint in ``checkpoint/`` or, between the two renames, in ``checkpoint.old/``, which
:func:`read_checkpoint` falls back to. ``metrics.json`` is derived from the checkpoint's records,
so a resumed run rewrites it with every round exactly once.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from peft import PeftModel
from safetensors.numpy import load_file, save_file

from .adapters import write_adapter_files
from .config import ConfigError, FedConfig, key_of, parse_run_config
from .files import fresh_temp_dir, replace_dir
from .records import RoundRecord, records_from_json
from .run_folder import CHECKPOINT_ARRAYS, CHECKPOINT_STATE, RunFolder

FORMAT = 1
GLOBAL = "global"
# keys a resumed run may differ in: the resume flag itself, and the folder (it may have moved)
RESUME_EXEMPT = (key_of("resume"), key_of("out_dir"))


@dataclass
class ServerState:
    """What the coordinator holds after a round.

    Attributes
    ----------
    server_round
        The last finished round.
    global_arrays
        The shared adapter after that round, in wire order.
    strategy_arrays
        Named lists of arrays of the strategy's optimiser state (empty for FedAvg/FedProx).
    records
        The ``metrics.json`` records up to and including ``server_round``.
    base_fingerprint
        SHA-256 fingerprint of the pinned base model.
    accountant
        ``PrivacyAccountant.state_dict()`` under client-level DP, else ``None``.
    rng
        The coordinator's random-generator states (:func:`rng_state`).
    """

    server_round: int
    global_arrays: list[np.ndarray]
    strategy_arrays: dict[str, list[np.ndarray]]
    records: list[RoundRecord]
    base_fingerprint: str
    accountant: dict[str, Any] | None = None
    rng: dict[str, Any] = field(default_factory=dict)


def rng_state() -> dict[str, Any]:
    """JSON-able states of Python's and numpy's global generators.

    The coordinator's only randomness: Flower samples sites with ``random`` (when
    ``fraction-train`` < 1) and shuffles SecAgg+ neighbours with it; Flower's central-DP wrapper
    draws its noise from numpy's global generator. Site training is seeded by ``seed`` + round.
    """
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore generator states saved by :func:`rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def _array_key(prefix: str, index: int) -> str:
    return f"{prefix}.{index:04d}"


def write_checkpoint(folder: Path, model: PeftModel, metadata: dict[str, Any], state: ServerState) -> Path:
    """Write the checkpoint of ``state`` (and ``model``'s adapter in PEFT format) to ``folder``, atomically.

    Returns
    -------
    Path
        ``folder``.
    """
    folder = Path(folder)
    tmp = fresh_temp_dir(folder)
    write_adapter_files(model, tmp, {**metadata, "round": state.server_round})
    tensors = {_array_key(GLOBAL, i): np.ascontiguousarray(a) for i, a in enumerate(state.global_arrays)}
    for name, arrays in state.strategy_arrays.items():
        if "." in name or name == GLOBAL:
            raise ValueError(f"Strategy state name {name!r} must not contain '.' nor be {GLOBAL!r}.")
        tensors.update({_array_key(name, i): np.ascontiguousarray(a) for i, a in enumerate(arrays)})
    save_file(tensors, str(tmp / CHECKPOINT_ARRAYS))
    (tmp / CHECKPOINT_STATE).write_text(
        json.dumps(
            {
                "format": FORMAT,
                "round": state.server_round,
                "base_model_fingerprint": state.base_fingerprint,
                "records": [r.to_json() for r in state.records],
                "accountant": state.accountant,
                "rng": state.rng,
            },
            indent=1,
        )
        + "\n"
    )
    replace_dir(tmp, folder)
    return folder


def read_checkpoint(out_dir: Path) -> ServerState:
    """Read the last checkpoint of the run in ``out_dir``.

    Raises
    ------
    FileNotFoundError
        When the run has no complete checkpoint (it stopped before its first round finished).
    ValueError
        When the checkpoint is of another format or its arrays are incomplete (names the file).
    """
    run = RunFolder(Path(out_dir))
    folder = run.find_checkpoint()
    if folder is None:
        raise FileNotFoundError(
            f"{run.checkpoint} holds no complete checkpoint: the run stopped before its first round "
            "finished. Start it again without resuming."
        )
    meta = json.loads((folder / CHECKPOINT_STATE).read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(
            f"{folder / CHECKPOINT_STATE} has checkpoint format {meta.get('format')!r}; this fedtune reads "
            f"format {FORMAT}. Resume it with the fedtune version that wrote it."
        )
    tensors = load_file(str(folder / CHECKPOINT_ARRAYS))
    groups: dict[str, list[tuple[int, np.ndarray]]] = {}
    for key, array in tensors.items():
        prefix, _, index = key.rpartition(".")
        groups.setdefault(prefix, []).append((int(index), array))
    lists = {prefix: [a for _, a in sorted(items, key=lambda x: x[0])] for prefix, items in groups.items()}
    for prefix, items in groups.items():
        if sorted(i for i, _ in items) != list(range(len(items))):
            raise ValueError(
                f"{folder / CHECKPOINT_ARRAYS}: the arrays of `{prefix}` are not numbered 0..n-1."
            )
    if GLOBAL not in lists:
        raise ValueError(f"{folder / CHECKPOINT_ARRAYS} lacks the global adapter arrays (`{GLOBAL}.*`).")
    global_arrays = lists.pop(GLOBAL)
    return ServerState(
        server_round=int(meta["round"]),
        global_arrays=global_arrays,
        strategy_arrays=lists,
        records=records_from_json(meta["records"], str(folder / CHECKPOINT_STATE)),
        base_fingerprint=str(meta["base_model_fingerprint"]),
        accountant=meta.get("accountant"),
        rng=dict(meta.get("rng") or {}),
    )


def resume_config(out_dir: Path, given: Mapping[str, Any] | None = None) -> FedConfig:
    """The config of the run in ``out_dir``, set to resume; refuse a ``given`` key whose value differs.

    Parameters
    ----------
    out_dir
        The run's folder (holds ``run_config.json``).
    given
        Run-config items the caller asks for (strings or typed); each must equal the saved value,
        except ``resume`` and ``out-dir``.

    Returns
    -------
    FedConfig
        The saved config with ``resume=true`` and ``out-dir`` = ``out_dir``.

    Raises
    ------
    ConfigError
        No ``run_config.json`` in ``out_dir``, or a given key differs (names the key and both values).
    """
    path = RunFolder(Path(out_dir)).run_config
    if not path.is_file():
        raise ConfigError(f"Cannot resume {out_dir}: it has no {path.name} (not a fedtune run folder).")
    saved = parse_run_config(json.loads(path.read_text())).to_run_config()
    wanted = parse_run_config({**saved, **(given or {})}).to_run_config()
    for key, value in saved.items():
        if key not in RESUME_EXEMPT and wanted[key] != value:
            raise ConfigError(
                f"Run-config key `{key}` is {value!r} in {path} but {wanted[key]!r} was given: a resumed run "
                "keeps the config it started with. Drop that override, or start a new run in another folder."
            )
    return parse_run_config({**saved, key_of("resume"): True, key_of("out_dir"): str(out_dir)})
