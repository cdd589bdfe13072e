"""The coordinator's state for one run, built complete before the first round.

:class:`RunState` gathers what the round stages (:mod:`fedtune.server.stages`) read and change:

- :class:`SharedModel`: the pinned base model, the adapter being tuned and the held-out set;
- :class:`RoundState`: what changes from round to round (records, the DP noise each site adds,
  which sites hold the base model); a resumed run's is rebuilt from its checkpoint;
- :class:`Strategies`: Flower's strategy as the run wraps it (update guard, central DP);
- the metered grid, the SecAgg+ workflow, the base-model distributor and the privacy accountant.

Nothing in it is filled in later: :func:`fedtune.server.federation.run_coordinator` builds the
parts in order and hands the complete state to the workflow.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fedtune.common import instructions
from fedtune.common.adapters import frozen_adapter_fingerprint, get_adapter_arrays, set_adapter_arrays
from fedtune.common.base_files import fingerprint, resolve_base
from fedtune.common.checkpoint import ServerState, set_rng_state
from fedtune.common.config import FedConfig
from fedtune.common.data import TextDataset
from fedtune.common.dp_sgd import SITE_KEYS, SITE_LABEL
from fedtune.common.model import base_model_nbytes, bring_up, trainable_counts
from fedtune.common.privacy import PrivacyAccountant
from fedtune.common.records import RoundRecord
from fedtune.common.run_folder import RunFolder
from fedtune.common.sites import coordinator_max_weight, coordinator_test_set
from fedtune.common.train import evaluate
from flwr.server.strategy import DifferentialPrivacyClientSideFixedClipping, Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from .distribution import Distributor
from .progress import RunProgress
from .strategy import UpdateGuard, make_strategy, weighted_mean
from .strategy_state import restore_strategy_state
from .wire import MeteredGrid


@dataclass(frozen=True)
class SharedModel:
    """The coordinator's copy of the model being tuned and the held-out set it is scored on.

    Attributes
    ----------
    initial
        The adapter arrays the run starts from (a resumed run: the checkpointed adapter).
    frozen_fingerprint
        FFA-LoRA's fingerprint of the frozen A matrices every site must share, else ``""``.
    """

    model_dir: Path
    fingerprint: str
    model: PeftModel
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    test_set: TextDataset
    initial: list[np.ndarray]
    frozen_fingerprint: str
    trainable: int
    total: int
    base_model_bytes: int

    @classmethod
    def load(cls, cfg: FedConfig, resumed: ServerState | None) -> SharedModel:
        """Load the base model and held-out set; start from ``resumed``'s adapter when given.

        Raises
        ------
        ValueError
            ``resumed`` was made with another base model (names both fingerprints).
        """
        model_dir = resolve_base(cfg)
        pinned = fingerprint(model_dir)
        test_set = coordinator_test_set(cfg)
        parts = bring_up(cfg, len(test_set.label_names), model_dir)
        model = parts.model
        if resumed is not None:
            if resumed.base_fingerprint != pinned:
                raise ValueError(
                    f"The checkpoint in {RunFolder(Path(cfg.out_dir)).checkpoint} was made with base model "
                    f"fingerprint {resumed.base_fingerprint}, but {model_dir} has {pinned}: resume with the "
                    "base model the run started with."
                )
            set_adapter_arrays(model, resumed.global_arrays)
        trainable, total = trainable_counts(model)
        return cls(
            model_dir=model_dir,
            fingerprint=pinned,
            model=model,
            tokenizer=parts.tokenizer,
            device=parts.device,
            test_set=test_set,
            # a resumed run starts from the checkpointed arrays exactly as they were (dtype included)
            initial=[np.asarray(a) for a in resumed.global_arrays] if resumed else get_adapter_arrays(model),
            frozen_fingerprint=frozen_adapter_fingerprint(model),
            trainable=trainable,
            total=total,
            base_model_bytes=base_model_nbytes(model_dir),
        )


@dataclass
class RoundState:
    """What changes from round to round.

    Attributes
    ----------
    records
        One record per finished round (round 0: the initial adapter's score).
    start_round
        The first round to run (a resumed run starts after its checkpointed round).
    dp_noise_std
        Distributed DP: the noise std each sampled site adds this round.
    sampling_rate
        The share of the available sites sampled this round (the accountant's q).
    stopped_early
        Why the run stopped before its last round (the privacy budget), else ``""``.
    round_start
        When the current round started (``time.perf_counter``).
    site_examples
        The example counts of the sites in this round's aggregate.
    site_example_dp
        Patient-level DP: each site's DP-SGD figures this round (label -> epsilon, sigma, steps, q).
    round_sites
        Site nodes drawn for this round's training and evaluation (before the round).
    model_ready
        Site nodes known to hold the pinned base model.
    distribution
        One record per site node and base-model check (``base_model_distribution.json``).
    """

    records: list[RoundRecord] = field(default_factory=list)
    start_round: int = 1
    dp_noise_std: float = 0.0
    sampling_rate: float = 1.0
    stopped_early: str = ""
    round_start: float = field(default_factory=time.perf_counter)
    site_examples: list[int] = field(default_factory=list)
    site_example_dp: dict[str, dict[str, float]] = field(default_factory=dict)
    round_sites: list[int] = field(default_factory=list)
    model_ready: set[int] = field(default_factory=set)
    distribution: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def resumed(cls, state: ServerState, folder: RunFolder) -> RoundState:
        """The round state after ``state``'s round; the killed run's random states are restored."""
        if state.rng:
            set_rng_state(state.rng)
        transfers = json.loads(folder.distribution.read_text()) if folder.distribution.is_file() else []
        return cls(records=list(state.records), start_round=state.server_round + 1, distribution=transfers)


@dataclass(frozen=True)
class Strategies:
    """Flower's strategy as the run wraps it.

    Attributes
    ----------
    guard
        The outermost strategy: checks every update and records which sites each aggregate holds.
    base
        The plain strategy (FedAvg, FedAdam, ...): its sampling decides n, its state is checkpointed.
    dp_wrapper
        Flower's central-DP wrapper around ``base`` (``dp-mode=central``), else ``None``.
    """

    guard: UpdateGuard
    base: Strategy
    dp_wrapper: DifferentialPrivacyClientSideFixedClipping | None


@dataclass(frozen=True)
class RunState:
    """Everything the round stages read and change during one coordinator run."""

    cfg: FedConfig
    folder: RunFolder
    shared: SharedModel
    rounds: RoundState
    grid: MeteredGrid
    strategies: Strategies
    secagg: SecAggPlusWorkflow | None
    distributor: Distributor | None
    accountant: PrivacyAccountant | None
    max_weight: float
    progress: RunProgress | None

    @property
    def solves_head(self) -> bool:
        """Whether the coordinator solves the shared head from the sites' statistics (``head-fit``)."""
        return self.cfg.solves_head(len(self.shared.test_set.label_names))


def make_accountant(cfg: FedConfig, resumed: ServerState | None) -> PrivacyAccountant | None:
    """Client-level DP's accountant (continued from ``resumed``), else ``None``."""
    if cfg.client_dp == "off":
        return None
    if resumed is not None and resumed.accountant is not None:
        return PrivacyAccountant.from_state_dict(resumed.accountant)
    return PrivacyAccountant(
        noise_multiplier=cfg.dp_noise_multiplier, delta=cfg.dp_delta, accountant=cfg.dp_accountant
    )


def max_weight(cfg: FedConfig) -> float:
    """SecAgg+'s weight normaliser: under DP every site weighs 1; else the largest possible site count."""
    return 1.0 if cfg.client_dp != "off" else coordinator_max_weight(cfg)


def make_strategies(
    cfg: FedConfig, shared: SharedModel, rounds: RoundState, grid: MeteredGrid, resumed: ServerState | None
) -> Strategies:
    """Flower's strategy with the coordinator's callbacks, wrapped; its state restored from ``resumed``."""

    def instruction(server_round: int) -> dict[str, Any]:
        """Config sent with every train/evaluate message of ``server_round``."""
        return instructions.encode(
            cfg,
            server_round,
            shared.fingerprint,
            dp_noise_std=rounds.dp_noise_std,
            frozen_fingerprint=shared.frozen_fingerprint,
        )

    def evaluate_shared(
        server_round: int, arrays: list[np.ndarray], _: dict
    ) -> tuple[float, dict[str, float]]:
        """Score the current shared adapter on the held-out set (round 0 is recorded here)."""
        set_adapter_arrays(shared.model, arrays)
        res = evaluate(
            shared.model,
            shared.tokenizer,
            shared.test_set,
            batch_size=cfg.batch_size,
            max_length=cfg.max_length,
            device=shared.device,
            max_new_tokens=cfg.max_new_tokens,
        )
        if server_round == 0:
            rounds.records.append(RoundRecord(round=0, **res.as_metrics()))
        return res.loss, res.as_metrics()

    def fit_metrics(results: list[tuple[int, dict]]) -> dict[str, float]:
        """Aggregate the sites' fit metrics; keep each site's example count and DP-SGD figures apart."""
        rounds.site_examples = sorted(n for n, _ in results)
        rounds.site_example_dp = {
            str(m[SITE_LABEL]): {k.removeprefix("dp_example_"): float(m[k]) for k in SITE_KEYS}
            for _, m in results
            if SITE_LABEL in m
        }
        shared = [(n, {k: v for k, v in m.items() if k not in (SITE_LABEL, *SITE_KEYS)}) for n, m in results]
        return weighted_mean(shared)

    strategy = make_strategy(
        cfg,
        initial=shared.initial,
        on_fit_config_fn=instruction,
        on_evaluate_config_fn=instruction,
        evaluate_fn=evaluate_shared,
        fit_metrics_fn=fit_metrics,
    )
    inner = strategy.strategy
    dp_wrapper = inner if isinstance(inner, DifferentialPrivacyClientSideFixedClipping) else None
    base = dp_wrapper.strategy if dp_wrapper else inner
    if resumed is not None:
        restore_strategy_state(base, resumed.strategy_arrays)
    guard = UpdateGuard(
        strategy,
        [a.shape for a in shared.initial],
        secure=cfg.secure_aggregation,
        tolerate_missing=cfg.client_dp == "off",
        failed_replies=grid.failed_replies,
    )
    return Strategies(guard=guard, base=base, dp_wrapper=dp_wrapper)


def make_secagg(cfg: FedConfig, weight: float) -> SecAggPlusWorkflow | None:
    """Flower's SecAgg+ workflow from the run config (``secure-aggregation=false``: ``None``)."""
    if not cfg.secure_aggregation:
        return None
    return SecAggPlusWorkflow(
        num_shares=cfg.secagg_num_shares,
        reconstruction_threshold=cfg.secagg_reconstruction_threshold,
        max_weight=weight,
        clipping_range=cfg.secagg_clipping_range,
        quantization_range=cfg.secagg_quantization_range,
        timeout=cfg.secagg_timeout or None,
    )
