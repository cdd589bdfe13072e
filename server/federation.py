"""The coordinator's run: pin the base model, aggregate, score, checkpoint, write the shared adapter."""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import flwr
import numpy as np
import peft
import torch
import transformers
from fedtune.common import instructions
from fedtune.common.adapters import (
    adapter_names,
    frozen_adapter_fingerprint,
    get_adapter_arrays,
    nbytes,
    save_shared_adapter,
    set_adapter_arrays,
)
from fedtune.common.audit import save_arrays, trim_audit
from fedtune.common.checkpoint import (
    CHECKPOINT,
    RUN_CONFIG,
    ServerState,
    find_checkpoint,
    read_checkpoint,
    resume_config,
    rng_state,
    set_rng_state,
    write_checkpoint,
)
from fedtune.common.config import FedConfig
from fedtune.common.model import (
    PeftSpec,
    base_model_nbytes,
    build_peft_model,
    fingerprint,
    load_tokenizer,
    resolve_model_dir,
    trainable_counts,
)
from fedtune.common.plots import plot_records
from fedtune.common.privacy import PrivacyAccountant
from fedtune.common.sites import coordinator_max_weight, coordinator_test_set
from fedtune.common.train import evaluate, select_device
from flwr.app import Context
from flwr.common import parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.server import ServerConfig
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import DifferentialPrivacyClientSideFixedClipping, Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_PARAMS_RECORD
from flwr.server.workflow.default_workflows import default_fit_workflow
from flwr.serverapp import Grid

from .distribution import DISTRIBUTION, Distributor
from .progress import RunProgress
from .strategy import UpdateGuard, make_strategy, restore_strategy_state, strategy_state, weighted_mean
from .wire import MeteredGrid
from .workflow import FedtuneWorkflow

log = logging.getLogger(__name__)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` via a temp file and rename (never a half-written file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def _latest(history_metrics: dict[str, list[tuple[int, Any]]], key: str, server_round: int) -> Any:
    values = [v for r, v in history_metrics.get(key, []) if r == server_round]
    return float(values[-1]) if values else None


@dataclass
class Coordinator:
    """State of one coordinator run; its methods are the strategy and workflow callbacks."""

    cfg: FedConfig
    out_dir: Path
    progress: RunProgress | None = None
    records: list[dict[str, Any]] = field(default_factory=list)
    start_round: int = 1  # a resumed run starts after its checkpointed round

    def __post_init__(self) -> None:
        self.model_dir = resolve_model_dir(self.cfg.base_model)
        self.base_fingerprint = fingerprint(self.model_dir)
        self.test_set = coordinator_test_set(self.cfg)
        self.label_names = self.test_set.label_names
        self.model = build_peft_model(PeftSpec.from_config(self.cfg, self.model_dir, len(self.label_names)))
        self.tokenizer = load_tokenizer(self.model_dir)
        self.device = select_device(self.cfg.device)
        self.initial = get_adapter_arrays(self.model)
        self.frozen_fingerprint = frozen_adapter_fingerprint(self.model)  # FFA-LoRA's A, else ""
        # SecAgg+ weight normaliser: under DP every site weighs 1; else the largest possible site count.
        dp = self.cfg.dp_mode != "off"
        self.max_weight = 1.0 if dp else coordinator_max_weight(self.cfg)
        self.trainable, self.total = trainable_counts(self.model)
        self.base_model_bytes = base_model_nbytes(self.model_dir)
        self.accountant = (
            PrivacyAccountant(
                noise_multiplier=self.cfg.dp_noise_multiplier,
                delta=self.cfg.dp_delta,
                accountant=self.cfg.dp_accountant,
            )
            if dp
            else None
        )
        self.audit_dir = self.out_dir / "audit" if self.cfg.audit else None
        self.grid: MeteredGrid | None = None
        self.distributor: Distributor | None = None  # sends the base model to sites that lack it
        self.model_ready: set[int] = set()  # site nodes known to hold the pinned base model
        self.distribution: list[dict[str, Any]] = []  # one record per site node and check
        self.base_strategy: Strategy | None = None  # the plain strategy (its sampling decides n)
        self.guard: UpdateGuard | None = None  # the outermost strategy: which sites each aggregate holds
        self.dp_wrapper: DifferentialPrivacyClientSideFixedClipping | None = None
        self.secagg: SecAggPlusWorkflow | None = None
        self.dp_noise_std = 0.0
        self.sampling_rate = 1.0
        self.stopped_early = ""
        self._round_start = time.perf_counter()
        self._site_examples: list[int] = []

    # --- strategy callbacks -------------------------------------------------------------------
    def instruction(self, server_round: int) -> dict[str, Any]:
        """Config sent with every train/evaluate message of ``server_round``."""
        return instructions.encode(
            self.cfg,
            server_round,
            self.base_fingerprint,
            dp_noise_std=self.dp_noise_std,
            frozen_fingerprint=self.frozen_fingerprint,
        )

    def evaluate_shared(
        self, server_round: int, arrays: list[np.ndarray], _: dict
    ) -> tuple[float, dict[str, float]]:
        """Score the current shared adapter on the coordinator's held-out test set."""
        set_adapter_arrays(self.model, arrays)
        res = evaluate(
            self.model,
            self.tokenizer,
            self.test_set,
            batch_size=self.cfg.batch_size,
            max_length=self.cfg.max_length,
            device=self.device,
        )
        if server_round == 0:
            self.records.append({"round": 0, **res.as_metrics(), "seconds": 0.0})
        return res.loss, res.as_metrics()

    def fit_metrics(self, results: list[tuple[int, dict]]) -> dict[str, float]:
        """Aggregate the sites' fit metrics; remember each site's example count for the round record."""
        self._site_examples = sorted(n for n, _ in results)
        return weighted_mean(results)

    # --- workflow hooks ---------------------------------------------------------------------------
    def before_round(self, server_round: int, context: LegacyContext) -> bool:
        """Ship the base model to new sites; size SecAgg+ and DP to this round's sampled sites.

        Returns ``False`` when the round would go over the privacy budget.
        """
        assert self.base_strategy is not None
        if self.distributor is not None:
            context.client_manager.wait_for(self.cfg.min_clients, timeout=self.cfg.base_model_timeout)
            self.distribute_base_model(server_round)
        available = context.client_manager.num_available()
        sampled, _ = self.base_strategy.num_fit_clients(available)  # type: ignore[attr-defined]
        self.sampling_rate = sampled / max(available, 1)
        if self.secagg is not None:
            self.secagg.num_shares = max(2, min(self.cfg.secagg_num_shares, sampled))
            self.secagg.reconstruction_threshold = max(
                2, min(self.cfg.secagg_reconstruction_threshold, self.secagg.num_shares)
            )
        if self.dp_wrapper is not None:
            self.dp_wrapper.num_sampled_clients = sampled
        if self.cfg.dp_mode == "distributed":
            # each of the n sites adds N(0, sigma^2 C^2 / n): the sum carries N(0, sigma^2 C^2)
            self.dp_noise_std = self.cfg.dp_noise_multiplier * self.cfg.dp_clipping_norm / sampled**0.5
        target = self.cfg.dp_target_epsilon
        if (
            self.accountant is not None
            and target > 0
            and self.accountant.would_exceed(target, self.sampling_rate)
        ):
            self.stopped_early = (
                f"stopped before round {server_round}: "
                f"it would take epsilon past `dp-target-epsilon` {target:g}"
            )
            log.warning(self.stopped_early)
            return False
        if self.audit_dir is not None:
            current = compat.arrayrecord_to_parameters(context.state.array_records[MAIN_PARAMS_RECORD], True)
            save_arrays(
                self.audit_dir / "server" / f"global-round-{server_round:03d}.npz",
                parameters_to_ndarrays(current),
            )
        return True

    def distribute_base_model(self, server_round: int) -> None:
        """Check the sites that joined since the last check; send the base model to those lacking it.

        A site whose check or transfer failed is checked again before the next round; its training
        fails until then (a dropout). Writes ``base_model_distribution.json``.
        """
        assert self.distributor is not None and self.grid is not None
        new = sorted(set(self.grid.get_node_ids()) - self.model_ready)
        if not new:
            return
        transfers = self.distributor.run(new)
        self.model_ready.update(t.node for t in transfers if t.status != "failed")
        self.distribution.extend({"before_round": server_round, **t.as_dict()} for t in transfers)
        write_json_atomic(self.out_dir / DISTRIBUTION, self.distribution)
        sent = [t for t in transfers if t.status == "received"]
        if sent and self.progress:
            self.progress.console.print(
                f"Base model sent to {len(sent)} site(s): {max(t.bytes_down for t in sent) / 1e6:.1f} MB "
                f"each in {max(t.seconds for t in sent):.1f} s; fingerprint verified by each site."
            )

    def after_fit(self, server_round: int, context: LegacyContext) -> None:
        """Fail loudly when the round produced no aggregate; the checkpoint keeps the last good round.

        Raises
        ------
        RuntimeError
            Saying why the round failed and where the last good adapter is.
        """
        if any(r == server_round for r, _ in context.history.metrics_distributed_fit.get("train_loss", [])):
            return
        outcome = self.guard.outcomes.get(server_round) if self.guard else None
        if outcome is not None and outcome.failure:
            why = outcome.failure
        elif self.secagg is not None:
            failed = self.grid.failed_replies(server_round) if self.grid else {}
            why = (
                "SecAgg+ could not unmask the sum: too few sites replied at some stage for "
                f"`secagg-reconstruction-threshold` {self.secagg.reconstruction_threshold}"
                + (f" (failed: {failed})" if failed else "")
            )
        else:
            why = "no site update arrived"
        raise RuntimeError(f"Round {server_round} produced no aggregate: {why}. {self._resume_advice()}")

    def _resume_advice(self) -> str:
        """Resume from the checkpoint if the run has one; else start again."""
        if find_checkpoint(self.out_dir) is None:
            return "No round completed, so there is nothing to resume: fix the cause and start the run again."
        last = self.records[-1]["round"] if self.records else 0
        return (
            f"The last good adapter (round {last}) is in {self.out_dir / CHECKPOINT}; fix the cause and "
            "continue with `resume=true` (`fedtune simulate --resume` / `fedtune deploy-local --resume`)."
        )

    def round_end(self, server_round: int, context: LegacyContext) -> None:
        """Record the round; rewrite the checkpoint, then ``metrics.json`` (so it never runs ahead)."""
        hist = context.history
        wire = self.grid.round_bytes(server_round) if self.grid else {"down": {}, "up": {}}
        central, dist = hist.metrics_centralized, hist.metrics_distributed
        outcome = self.guard.outcomes.pop(server_round, None) if self.guard else None
        record = {
            "round": server_round,
            **{k: _latest(central, k, server_round) for k in ("loss", "accuracy", "macro_f1", "auc")},
            **{f"sites_{k}": _latest(dist, k, server_round) for k in ("loss", "accuracy", "macro_f1", "auc")},
            "train_loss": _latest(hist.metrics_distributed_fit, "train_loss", server_round),
            "site_train_examples": self._site_examples,
            "site_examples_per_second": _latest(
                hist.metrics_distributed_fit, "examples_per_second", server_round
            ),
            "excluded_sites": {str(k): v for k, v in sorted(outcome.excluded.items())} if outcome else {},
            "bytes_up": sum(wire["up"].values()),
            "bytes_down": sum(wire["down"].values()),
            "bytes_up_per_site": {str(k): v for k, v in sorted(wire["up"].items())},
            "bytes_down_per_site": {str(k): v for k, v in sorted(wire["down"].items())},
            "seconds": time.perf_counter() - self._round_start,
        }
        if self.accountant is not None:
            self.accountant.step(self.sampling_rate)
            record["dp_epsilon"] = self.accountant.epsilon()
        self._round_start = time.perf_counter()
        self.records.append(record)
        self.checkpoint(server_round, context)
        if self.accountant is not None:
            write_json_atomic(self.out_dir / "privacy.json", self.privacy())
        write_json_atomic(self.out_dir / "metrics.json", self.records)
        if self.progress:
            self.progress.round_done(record)

    # --- checkpoint and resume --------------------------------------------------------------------
    def checkpoint(self, server_round: int, context: LegacyContext) -> None:
        """Write everything a killed run needs to continue after ``server_round`` (atomically)."""
        current = compat.arrayrecord_to_parameters(context.state.array_records[MAIN_PARAMS_RECORD], True)
        global_arrays = parameters_to_ndarrays(current)
        set_adapter_arrays(self.model, global_arrays)  # the PEFT files hold exactly the global adapter
        state = ServerState(
            server_round=server_round,
            global_arrays=global_arrays,
            strategy_arrays=strategy_state(self.base_strategy) if self.base_strategy else {},
            records=self.records,
            base_fingerprint=self.base_fingerprint,
            accountant=self.accountant.state_dict() if self.accountant else None,
            rng=rng_state(),
        )
        write_checkpoint(self.out_dir / CHECKPOINT, self.model, self.metadata(), state)

    def restore(self, state: ServerState) -> None:
        """Continue from a checkpoint: its adapter, records, accountant and random states.

        Raises
        ------
        ValueError
            When the checkpoint was made with another base model (names both fingerprints).
        """
        if state.base_fingerprint != self.base_fingerprint:
            raise ValueError(
                f"The checkpoint in {self.out_dir / CHECKPOINT} was made with base model fingerprint "
                f"{state.base_fingerprint}, but {self.model_dir} has {self.base_fingerprint}: resume with "
                "the base model the run started with."
            )
        set_adapter_arrays(self.model, state.global_arrays)
        self.initial = [np.asarray(a) for a in state.global_arrays]
        self.records = list(state.records)
        self.start_round = state.server_round + 1
        if state.accountant is not None:
            self.accountant = PrivacyAccountant.from_state_dict(state.accountant)
        if state.rng:
            set_rng_state(state.rng)
        if (self.out_dir / DISTRIBUTION).is_file():  # keep the killed run's transfer records
            self.distribution = json.loads((self.out_dir / DISTRIBUTION).read_text())

    # --- outputs -------------------------------------------------------------------------------------
    def privacy(self) -> dict[str, Any]:
        """The accountant's inputs and result: enough for anyone to recompute epsilon with dp-accounting."""
        assert self.accountant is not None
        return {
            "dp_mode": self.cfg.dp_mode,
            "clipping_norm": self.cfg.dp_clipping_norm,
            "target_epsilon": self.cfg.dp_target_epsilon,
            "epsilon": self.accountant.epsilon(),
            "stopped_early": self.stopped_early,
            "accountant": self.accountant.state_dict(),
        }

    def metadata(self) -> dict[str, Any]:
        """What ``fedtune.json`` records beside the adapter."""
        return {
            "base_model": str(self.model_dir),
            "base_model_fingerprint": self.base_fingerprint,
            "peft_method": self.cfg.peft_method,
            "task": self.cfg.task,
            "label_names": list(self.label_names),
            "text_serialisation": self.test_set.serialisation,
            "max_length": self.cfg.max_length,
            "adapter_tensors": adapter_names(self.model),
            "adapter_shapes": [list(a.shape) for a in self.initial],
            "adapter_bytes": nbytes(self.initial),
            "base_model_bytes": self.base_model_bytes,
            "trainable_parameters": self.trainable,
            "total_parameters": self.total,
            "trainable_percent": 100.0 * self.trainable / self.total,
            "secure_aggregation": self.cfg.secure_aggregation,
            "dp_mode": self.cfg.dp_mode,
            "secagg_max_weight": self.max_weight,
            "versions": {
                "flwr": flwr.__version__,
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "peft": peft.__version__,
                "python": platform.python_version(),
            },
        }

    def finish(self) -> Path:
        """Write ``adapter/`` (PEFT format + fedtune.json) and the plots; return the adapter folder."""
        if self.accountant is not None:
            write_json_atomic(self.out_dir / "privacy.json", self.privacy())
        if self.audit_dir is not None:
            save_arrays(self.audit_dir / "server" / "global-final.npz", get_adapter_arrays(self.model))
        adapter = save_shared_adapter(
            self.model,
            self.out_dir / "adapter",
            {**self.metadata(), "rounds": self.records[-1]["round"] if self.records else 0},
        )
        plot_records(self.records, self.out_dir / "plots")
        return adapter


def run_coordinator(
    grid: Grid, context: Context, cfg: FedConfig, progress: RunProgress | None = None
) -> Coordinator:
    """Run the whole federation on ``grid`` and write every output under ``cfg.out_dir``.

    With ``resume=true`` the run in ``out-dir`` continues after its last checkpoint: the config
    must equal its ``run_config.json``, and the checkpointed adapter, strategy state, records,
    accountant and random states are restored.

    Raises
    ------
    ConfigError
        A resumed run's config differs from the saved one (names the key).
    FileNotFoundError
        A resumed run has no checkpoint.
    """
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    resumed = None
    if cfg.resume:
        resume_config(out_dir, cfg.to_run_config())
        resumed = read_checkpoint(out_dir)
    else:
        cfg.save(out_dir / RUN_CONFIG)
    coord = Coordinator(cfg=cfg, out_dir=out_dir, progress=progress)
    if resumed is not None:
        coord.restore(resumed)
        if coord.audit_dir is not None:
            trim_audit(coord.audit_dir, resumed.server_round)
    summary = (
        f"Base model {coord.model_dir} (fingerprint {coord.base_fingerprint[:16]}...); "
        f"{cfg.peft_method} trains "
        f"{coord.trainable:,} of {coord.total:,} parameters ({100 * coord.trainable / coord.total:.3f}%); "
        f"adapter {nbytes(coord.initial) / 1e6:.2f} MB vs base model {coord.base_model_bytes / 1e6:.1f} MB; "
        f"secure aggregation {'SecAgg+' if cfg.secure_aggregation else 'off'}; strategy {cfg.strategy}."
        + (f" Resuming after round {resumed.server_round}." if resumed else "")
    )
    log.info(summary)
    if progress:
        progress.console.print(summary)
    coord.grid = MeteredGrid(grid, progress.stage if progress else None, coord.audit_dir)
    if cfg.distribute_base_model:
        coord.distributor = Distributor(
            coord.grid,
            coord.model_dir,
            coord.base_fingerprint,
            chunk_bytes=cfg.base_model_chunk_mb * 2**20,
            timeout=cfg.base_model_timeout,
        )
    strategy = make_strategy(
        cfg,
        initial=coord.initial,
        on_fit_config_fn=coord.instruction,
        on_evaluate_config_fn=coord.instruction,
        evaluate_fn=coord.evaluate_shared,
        fit_metrics_fn=coord.fit_metrics,
    )
    inner = strategy.strategy
    coord.dp_wrapper = inner if isinstance(inner, DifferentialPrivacyClientSideFixedClipping) else None
    coord.base_strategy = coord.dp_wrapper.strategy if coord.dp_wrapper else inner
    if resumed is not None:
        restore_strategy_state(coord.base_strategy, resumed.strategy_arrays)
    coord.guard = UpdateGuard(
        strategy,
        [a.shape for a in coord.initial],
        secure=cfg.secure_aggregation,
        tolerate_missing=cfg.dp_mode == "off",
        failed_replies=coord.grid.failed_replies,
    )
    legacy = LegacyContext(
        context=context, config=ServerConfig(num_rounds=cfg.num_server_rounds), strategy=coord.guard
    )
    fit_workflow = default_fit_workflow
    if cfg.secure_aggregation:
        coord.secagg = fit_workflow = SecAggPlusWorkflow(
            num_shares=cfg.secagg_num_shares,
            reconstruction_threshold=cfg.secagg_reconstruction_threshold,
            max_weight=coord.max_weight,
            clipping_range=cfg.secagg_clipping_range,
            quantization_range=cfg.secagg_quantization_range,
            timeout=cfg.secagg_timeout or None,
        )
    FedtuneWorkflow(fit_workflow, coord)(coord.grid, legacy)
    coord.finish()
    return coord
