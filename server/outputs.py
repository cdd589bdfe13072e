"""What a coordinator run writes besides the per-round records: checkpoint, adapter, privacy, plots."""

from __future__ import annotations

import platform
from importlib.metadata import version
from pathlib import Path
from typing import Any

import flwr
import numpy as np
import peft
import torch
import transformers
from fedtune.common.adapters import (
    adapter_names,
    get_adapter_arrays,
    nbytes,
    save_shared_adapter,
    set_adapter_arrays,
)
from fedtune.common.audit import save_arrays
from fedtune.common.checkpoint import ServerState, rng_state, write_checkpoint
from fedtune.common.config import FedConfig
from fedtune.common.files import write_json_atomic
from fedtune.common.head_fit import moments_shapes, statistics_shapes
from fedtune.common.options import GENERATIVE_TASKS
from fedtune.common.plots import plot_records
from fedtune.common.prompts import template_of

from .run_state import RunState
from .strategy_state import strategy_state


def _generation(cfg: FedConfig) -> dict[str, Any]:
    """How a generative task's prompts were built and answers generated (to use the adapter alike)."""
    template = template_of(cfg.task, cfg.prompt_template)
    return {"prompt_template": template, "max_new_tokens": cfg.max_new_tokens}


def _head_uploads(state: RunState) -> dict[str, Any]:
    """The shapes of what ``head-fit`` has the sites send besides the adapter (none when it is off)."""
    if not state.solves_head:
        return {}
    model = state.shared.model
    moments = {"head_moments_shapes": moments_shapes(model)} if state.secagg is not None else {}
    return {"head_statistics_shapes": statistics_shapes(model), **moments}


def metadata(state: RunState) -> dict[str, Any]:
    """What ``fedtune.json`` records beside the adapter (in ``adapter/`` and the checkpoint)."""
    cfg, shared = state.cfg, state.shared
    return {
        "base_model": str(shared.model_dir),
        "base_model_fingerprint": shared.fingerprint,
        "peft_method": cfg.peft_method,
        "task": cfg.task,
        "label_names": list(shared.test_set.label_names),
        "text_serialisation": shared.test_set.serialisation,
        "max_length": cfg.max_length,
        **(_generation(cfg) if cfg.task in GENERATIVE_TASKS else {}),
        "adapter_tensors": adapter_names(shared.model),
        "adapter_shapes": [list(a.shape) for a in shared.initial],
        **_head_uploads(state),
        "adapter_bytes": nbytes(shared.initial),
        "base_model_bytes": shared.base_model_bytes,
        "trainable_parameters": shared.trainable,
        "total_parameters": shared.total,
        "trainable_percent": 100.0 * shared.trainable / shared.total,
        "secure_aggregation": cfg.secure_aggregation,
        "dp_mode": cfg.dp_mode,
        "secagg_max_weight": state.max_weight,
        "versions": {
            "flwr": flwr.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "python": platform.python_version(),
        },
    }


def privacy_record(state: RunState) -> dict[str, Any]:
    """The accountants' inputs and results: enough for anyone to recompute each epsilon with dp-accounting.

    Client-level DP: the coordinator's accountant (top-level keys). Patient-level DP (``example_dp``):
    each site's last recorded DP-SGD figures (sigma, q, steps, epsilon) with the settings they follow.
    """
    cfg = state.cfg
    if cfg.dp_mode == "off":
        raise ValueError("privacy.json is written only under DP (`dp-mode` other than off).")
    out: dict[str, Any] = {"dp_mode": cfg.dp_mode, "delta": cfg.dp_delta}
    if state.accountant is not None:
        out |= {
            "clipping_norm": cfg.dp_clipping_norm,
            "target_epsilon": cfg.dp_target_epsilon,
            "epsilon": state.accountant.epsilon(),
            "stopped_early": state.rounds.stopped_early,
            "accountant": state.accountant.state_dict(),
        }
    if cfg.example_dp:
        sites: dict[str, Any] = {}
        for record in state.rounds.records:
            for label, figures in (record.sites_example_dp or {}).items():
                sites[label] = {**figures, "round": record.round}
        out["example_dp"] = {
            "unit": "one training record (patient)",
            "mechanism": "DP-SGD (Opacus): Poisson sampling, per-example clipping, Gaussian noise",
            "clipping_norm": cfg.dp_example_clipping_norm,
            "target_epsilon": cfg.dp_example_target_epsilon,
            "accountant": cfg.dp_accountant,
            "sites": sites,
            "epsilon": max((s["epsilon"] for s in sites.values()), default=None),
            "versions": {lib: version(lib) for lib in ("opacus", "dp-accounting")},
        }
    return out


def write_round_checkpoint(state: RunState, server_round: int, global_arrays: list[np.ndarray]) -> None:
    """Write the checkpoint after ``server_round`` (its PEFT files hold exactly ``global_arrays``)."""
    set_adapter_arrays(state.shared.model, global_arrays)
    server_state = ServerState(
        server_round=server_round,
        global_arrays=global_arrays,
        strategy_arrays=strategy_state(state.strategies.base),
        records=state.rounds.records,
        base_fingerprint=state.shared.fingerprint,
        accountant=state.accountant.state_dict() if state.accountant else None,
        rng=rng_state(),
    )
    write_checkpoint(state.folder.checkpoint, state.shared.model, metadata(state), server_state)


def resume_advice(state: RunState) -> str:
    """Resume from the checkpoint if the run has one; else start again."""
    if state.folder.find_checkpoint() is None:
        return "No round completed, so there is nothing to resume: fix the cause and start the run again."
    last = state.rounds.records[-1].round if state.rounds.records else 0
    return (
        f"The last good adapter (round {last}) is in {state.folder.checkpoint}; fix the cause and "
        "continue with `resume=true` (`fedtune simulate --resume` / `fedtune deploy-local --resume`)."
    )


def finish(state: RunState) -> Path:
    """Write ``adapter/`` (PEFT format + fedtune.json), ``privacy.json`` and the plots; return the adapter."""
    folder, records = state.folder, state.rounds.records
    if state.cfg.dp_mode != "off":
        write_json_atomic(folder.privacy, privacy_record(state))
    if state.cfg.audit:
        save_arrays(folder.global_final, get_adapter_arrays(state.shared.model))
    adapter = save_shared_adapter(
        state.shared.model, folder.adapter, {**metadata(state), "rounds": records[-1].round if records else 0}
    )
    plot_records(records, folder.plots)
    return adapter
