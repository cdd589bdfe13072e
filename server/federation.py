"""The coordinator's run: build the run state, run the rounds' stages, write the shared adapter.

:func:`run_coordinator` only wires: it prepares the run folder (a new run saves its config; a
resumed one checks it and reads the checkpoint), builds a complete
:class:`~fedtune.server.run_state.RunState` and runs :class:`~fedtune.server.workflow.FedtuneWorkflow`
with the stages of :mod:`fedtune.server.stages`; :func:`~fedtune.server.outputs.finish` writes the
adapter. The stages do the per-round work.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fedtune.common.adapters import nbytes
from fedtune.common.audit import trim_audit
from fedtune.common.checkpoint import ServerState, read_checkpoint, resume_config
from fedtune.common.config import FedConfig
from fedtune.common.run_folder import RunFolder
from flwr.app import Context
from flwr.server import ServerConfig
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow.default_workflows import default_fit_workflow
from flwr.serverapp import Grid

from .distribution import Distributor
from .outputs import finish
from .progress import RunProgress
from .run_state import (
    RoundState,
    RunState,
    SharedModel,
    make_accountant,
    make_secagg,
    make_strategies,
    max_weight,
)
from .sampling import RoundSampler
from .stages import AFTER_FIT, AFTER_ROUND, BEFORE_FIT
from .wire import MeteredGrid
from .workflow import FedtuneWorkflow, Stages

log = logging.getLogger(__name__)
STAGES = Stages(before_fit=BEFORE_FIT, after_fit=AFTER_FIT, after_round=AFTER_ROUND)


def prepare_folder(cfg: FedConfig) -> tuple[RunFolder, ServerState | None]:
    """Create the run folder; save a new run's config, or check a resumed run's and read its checkpoint.

    Raises
    ------
    ConfigError
        A resumed run's config differs from the saved one (names the key).
    FileNotFoundError
        A resumed run has no checkpoint.
    """
    folder = RunFolder(Path(cfg.out_dir))
    folder.root.mkdir(parents=True, exist_ok=True)
    if not cfg.resume:
        cfg.save(folder.run_config)
        return folder, None
    resume_config(folder.root, cfg.to_run_config())
    resumed = read_checkpoint(folder.root)
    if cfg.audit:
        trim_audit(folder.audit, resumed.server_round)
    return folder, resumed


def _summary(state: RunState, resumed: ServerState | None) -> str:
    cfg, shared = state.cfg, state.shared
    share = 100 * shared.trainable / shared.total
    return (
        f"Base model {shared.model_dir} (fingerprint {shared.fingerprint[:16]}...); {cfg.peft_method} trains "
        f"{shared.trainable:,} of {shared.total:,} parameters ({share:.3f}%); adapter "
        f"{nbytes(shared.initial) / 1e6:.2f} MB vs base model {shared.base_model_bytes / 1e6:.1f} MB; "
        f"secure aggregation {'SecAgg+' if cfg.secure_aggregation else 'off'}; strategy {cfg.strategy}."
        + (f" Resuming after round {resumed.server_round}." if resumed else "")
    )


def run_coordinator(
    grid: Grid, context: Context, cfg: FedConfig, progress: RunProgress | None = None
) -> RunState:
    """Run the whole federation on ``grid`` and write every output under ``cfg.out_dir``.

    With ``resume=true`` the run in ``out-dir`` continues after its last checkpoint: the config
    must equal its ``run_config.json``, and the checkpointed adapter, strategy state, records,
    accountant and random states are restored (errors: see :func:`prepare_folder`).
    """
    folder, resumed = prepare_folder(cfg)
    shared = SharedModel.load(cfg, resumed)
    rounds = RoundState.resumed(resumed, folder) if resumed else RoundState()
    metered = MeteredGrid(
        grid, progress.stage if progress else None, folder.audit_server if cfg.audit else None
    )
    weight = max_weight(cfg)
    distributor = (
        Distributor(
            metered,
            shared.model_dir,
            shared.fingerprint,
            chunk_bytes=cfg.base_model_chunk_mb * 2**20,
            timeout=cfg.base_model_timeout,
        )
        if cfg.distribute_base_model
        else None
    )
    state = RunState(
        cfg=cfg,
        folder=folder,
        shared=shared,
        rounds=rounds,
        grid=metered,
        strategies=make_strategies(cfg, shared, rounds, metered, resumed),
        secagg=make_secagg(cfg, weight),
        distributor=distributor,
        accountant=make_accountant(cfg, resumed),
        max_weight=weight,
        progress=progress,
    )
    log.info(_summary(state, resumed))
    if progress:
        progress.console.print(_summary(state, resumed))
    legacy = LegacyContext(
        context=context,
        config=ServerConfig(num_rounds=cfg.num_server_rounds),
        strategy=state.strategies.guard,
        client_manager=RoundSampler(),
    )
    FedtuneWorkflow(state.secagg or default_fit_workflow, STAGES, state)(metered, legacy)
    finish(state)
    return state
