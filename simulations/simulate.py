"""``fedtune simulate``: run the fedtune Flower app in Flower's simulation engine, in this environment.

``flwr.simulation.run_simulation`` runs the ServerApp and ClientApp in-process on Ray, so
no per-run dependency install happens (unlike ``flwr run .`` on a local connection).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from fedtune.common.checkpoint import read_checkpoint, resume_config
from fedtune.common.config import ConfigError, FedConfig, key_of, parse_run_config
from fedtune.common.files import write_json_atomic
from fedtune.common.preflight import check_simulation
from fedtune.common.records import RoundRecord, read_records
from fedtune.common.run_folder import RunFolder, fresh_run, holds_run
from fedtune.common.site_config import SiteConfig
from rich.console import Console

from .presets import get_preset

console = Console()


def _not_run_simulation_notice(record: logging.LogRecord) -> bool:
    """Drop Flower's notice that ``run_simulation`` is deprecated.

    fedtune calls it on purpose: ``flwr run`` would install a fresh environment for every run.
    """
    return "`run_simulation` function is deprecated" not in record.getMessage()


def resolve(
    preset: str = "default",
    num_clients: int | None = None,
    overrides: Mapping[str, Any] | None = None,
    out: str | None = None,
    overwrite: bool = False,
) -> tuple[FedConfig, int]:
    """Preset + overrides (+ ``--out``) -> the run's config and number of simulated hospitals."""
    p = get_preset(preset)
    run_config = {**p.run_config, **(overrides or {})}
    if out is not None:
        run_config[key_of("out_dir")] = out
    elif key_of("out_dir") not in run_config:  # a fresh folder per run: never overwrite earlier results
        run_config[key_of("out_dir")] = str(Path(FedConfig.out_dir) / time.strftime("%Y%m%d-%H%M%S"))
    cfg = parse_run_config(run_config)
    if holds_run(cfg.out_dir) and not overwrite:
        raise ValueError(
            f"`--out` {cfg.out_dir} already holds a run; pass --overwrite or choose another folder."
        )
    n = num_clients if num_clients is not None else p.num_clients
    if n < max(2, cfg.min_clients):
        raise ValueError(
            f"`--num-clients` {n} is below `min-clients` {cfg.min_clients} (and SecAgg+ needs 2)."
        )
    return cfg, n


def resume(
    folder: str | Path, num_clients: int | None = None, overrides: Mapping[str, Any] | None = None
) -> tuple[FedConfig, int]:
    """The config and number of hospitals that continue the simulated run in ``folder``.

    Raises
    ------
    ConfigError
        A given override or ``num_clients`` differs from the run's (names it), or ``folder`` is no run.
    FileNotFoundError
        The run has no checkpoint yet.
    ValueError
        The run already finished.
    """
    folder = Path(folder)
    cfg = resume_config(folder, overrides)
    run = RunFolder(folder)
    sim = run.simulation
    if not sim.is_file():
        raise ConfigError(f"Cannot resume {folder}: it has no {sim.name} (not a `fedtune simulate` run).")
    n = int(json.loads(sim.read_text())["num_clients"])
    if num_clients is not None and num_clients != n:
        raise ConfigError(
            f"`--num-clients` {num_clients} differs from the {n} hospitals of {folder}: "
            "a resumed run keeps them."
        )
    state = read_checkpoint(folder)
    adapter_meta = run.adapter_metadata
    if adapter_meta.is_file() and json.loads(adapter_meta.read_text()).get("rounds") == state.server_round:
        raise ValueError(
            f"The run in {folder} already finished (round {state.server_round}); nothing to resume."
        )
    return cfg, n


def simulate(
    cfg: FedConfig,
    num_clients: int,
    *,
    verbose: bool = False,
    node_config_fn: Callable[[SiteConfig], SiteConfig] | None = None,
) -> list[RoundRecord]:
    """Run one simulated federation; return the per-round records also saved in ``metrics.json``.

    A new run records ``num_clients`` in ``out-dir/simulation.json``; a resumed one
    (``cfg.resume``, see :func:`resume`) continues after its last checkpoint. ``node_config_fn``
    maps each simulated site's node config to the one it uses (a benchmark gives sites their own
    files, as deployed sites have).

    Raises
    ------
    PreflightError
        Before anything starts or is written, when the run cannot succeed
        (:func:`~fedtune.common.preflight.check_simulation`).
    RuntimeError
        The simulation ended without a shared adapter. A new run that fails before its first
        checkpoint leaves nothing behind, and a run it replaces (``--overwrite``) is kept until it
        finishes (:func:`~fedtune.common.run_folder.fresh_run`).
    """
    check_simulation(cfg, num_clients, node_config_fn)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # silence Ray's GPU-env FutureWarning
    from fedtune.client.app import make_client_app
    from fedtune.server.app import make_server_app
    from fedtune.server.progress import results_table
    from flwr.simulation import run_simulation  # heavy import: keep `fedtune --help` fast

    from .dispatch import use_fast_dispatch

    use_fast_dispatch()

    if not verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    if _not_run_simulation_notice not in logging.getLogger("flwr").filters:
        logging.getLogger("flwr").addFilter(_not_run_simulation_notice)
    gpu = torch.cuda.is_available() and cfg.device != "cpu"
    start = time.perf_counter()
    run = RunFolder(Path(cfg.out_dir))
    with contextlib.nullcontext() if cfg.resume else fresh_run(cfg.out_dir, echo=console.print):
        if not cfg.resume:
            write_json_atomic(run.simulation, {"num_clients": num_clients})
        run_simulation(
            server_app=make_server_app(cfg.to_run_config()),
            client_app=make_client_app(
                str(run.audit.resolve()) if cfg.audit else None,
                base_model=cfg.base_model,
                site_log_dir=str(run.site_logs.resolve()),
                node_config_fn=node_config_fn,
            ),
            num_supernodes=num_clients,
            backend_config={
                "client_resources": {"num_cpus": 1, "num_gpus": 0.5 if gpu else 0.0},
                "init_args": {"include_dashboard": False, "log_to_driver": verbose},
            },
            verbose_logging=verbose,
        )
        if not run.adapter_weights.is_file():
            raise RuntimeError(f"The simulation ended without writing {run.adapter}; see the log above.")
    records = read_records(run.metrics)
    console.print(
        results_table(records, f"fedtune · {num_clients} hospitals · {cfg.peft_method} · {cfg.task}")
    )
    console.print(
        f"Finished in {time.perf_counter() - start:.0f} s. Shared adapter: {cfg.out_dir}/adapter  "
        f"metrics: {run.metrics}  plots: {run.plots}/"
    )
    return records
