"""Aggregation strategies for the adapter: Flower's own FedAvg, FedProx, FedAvgM, FedAdam and FedYogi.

FedAvg averages the sites' adapters weighted by training examples; FedProx is the same
on the server and sends ``proximal_mu`` so sites add the proximal term; FedAvgM takes a server
SGD step with momentum on the averaged update; FedAdam and FedYogi take a server Adam / Yogi step
on it (Reddi et al., "Adaptive Federated Optimization", ICLR 2021). All work unchanged under
SecAgg+, which hands them one already-averaged result.

Around them, :class:`UpdateGuard` leaves bad and missing site updates out of a round (or voids
it), :class:`Float32Adapter` keeps the aggregate float32; :mod:`.strategy_state` carries a server
optimiser's state through a checkpoint.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from fedtune.common.config import FedConfig
from fedtune.common.updates import update_defect
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Metrics,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedOpt,
    FedProx,
    FedYogi,
    Strategy,
)

log = logging.getLogger(__name__)

ConfigFn = Callable[[int], dict[str, Scalar]]
MetricsFn = Callable[[list[tuple[int, Metrics]]], Metrics]
EvaluateFn = Callable[[int, list[np.ndarray], dict[str, Scalar]], tuple[float, dict[str, Scalar]] | None]


def weighted_mean(results: list[tuple[int, Metrics]]) -> Metrics:
    """Example-weighted mean of each numeric metric over the sites that reported it."""
    sums: dict[str, float] = {}
    weights: dict[str, int] = {}
    for num_examples, metrics in results:
        for key, value in metrics.items():
            if num_examples > 0 and isinstance(value, int | float):
                sums[key] = sums.get(key, 0.0) + num_examples * float(value)
                weights[key] = weights.get(key, 0) + num_examples
    return {key: sums[key] / weights[key] for key in sums}


class _Delegate(Strategy):
    """A strategy that hands every call to the wrapped ``strategy``; subclasses override some."""

    def __init__(self, strategy: Strategy) -> None:
        self.strategy = strategy

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.strategy!r})"

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:  # noqa: D102
        return self.strategy.initialize_parameters(client_manager)

    def configure_fit(  # noqa: D102
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        return self.strategy.configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(  # noqa: D102
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        return self.strategy.aggregate_fit(server_round, results, failures)

    def configure_evaluate(  # noqa: D102
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        return self.strategy.configure_evaluate(server_round, parameters, client_manager)

    def aggregate_evaluate(  # noqa: D102
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        return self.strategy.aggregate_evaluate(server_round, results, failures)

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:  # noqa: D102
        return self.strategy.evaluate(server_round, parameters)


class Float32Adapter(_Delegate):
    """Wrap a strategy so the aggregated adapter stays float32.

    SecAgg+ dequantises into float64 and FedAdam's maths promotes to float64; without this the
    next round would broadcast twice the adapter's bytes.
    """

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Aggregate with the wrapped strategy, then cast every tensor to float32."""
        parameters, metrics = self.strategy.aggregate_fit(server_round, results, failures)
        if parameters is not None:
            parameters = ndarrays_to_parameters(
                [a.astype(np.float32) for a in parameters_to_ndarrays(parameters)]
            )
        return parameters, metrics


@dataclass
class RoundOutcome:
    """Which sampled sites a round's aggregate leaves out and why, or why the round has none.

    Attributes
    ----------
    sampled
        Node ids the strategy sampled to train.
    excluded
        Node id -> reason, for every sampled site whose update is not in the aggregate.
    failure
        Why the round produced no aggregate (``""`` when it did).
    """

    sampled: set[int] = field(default_factory=set)
    excluded: dict[int, str] = field(default_factory=dict)
    failure: str = ""


class UpdateGuard(_Delegate):
    """Keep bad and missing site updates out of the aggregate, and a bad aggregate out of the run.

    In the clear (``secure=False``) every site's update is checked before aggregation
    (:func:`~fedtune.common.updates.update_defect`: tensor count, shapes, NaN/Inf, and a positive
    example count); an offending site is left out of the round and named in a log line. Under
    SecAgg+ no single update is visible: each site checks its own before masking (a bad one drops
    out, and SecAgg+ unmasks the others' sum), and this guard checks the unmasked sum. Sites that
    dropped out (an error reply, or none in time) are left out likewise: the wrapped strategy
    aggregates the others. Under client-level DP (``tolerate_missing=False``) the noise is sized to
    every sampled site, so a missing site voids the round instead. An aggregate that is not a
    finite adapter of the right shapes voids the round too; :attr:`outcomes` says why. The local
    evaluation averages the sites that replied.

    Parameters
    ----------
    strategy
        The strategy that aggregates the accepted updates.
    shapes
        The adapter's tensor shapes in wire order.
    secure
        Whether rounds run under SecAgg+ (every result then carries the unmasked sum).
    tolerate_missing
        Whether a round may aggregate fewer sites than were sampled.
    failed_replies
        ``round -> {node id: error}`` of the sites that answered the round with an error.
    """

    def __init__(
        self,
        strategy: Strategy,
        shapes: Sequence[tuple[int, ...]],
        *,
        secure: bool,
        tolerate_missing: bool,
        failed_replies: Callable[[int], Mapping[int, str]] | None = None,
    ) -> None:
        super().__init__(strategy)
        self.shapes = [tuple(s) for s in shapes]
        self.secure = secure
        self.tolerate_missing = tolerate_missing
        self.failed_replies = failed_replies or (lambda _: {})
        self.outcomes: dict[int, RoundOutcome] = {}

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """Configure with the wrapped strategy; remember which sites were sampled."""
        pairs = self.strategy.configure_fit(server_round, parameters, client_manager)
        self.outcomes[server_round] = RoundOutcome(sampled={proxy.node_id for proxy, _ in pairs})
        return pairs

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Aggregate the valid updates of the sites that replied; ``(None, {})`` voids the round."""
        outcome = self.outcomes.setdefault(server_round, RoundOutcome())
        errors = self.failed_replies(server_round)
        replied = {proxy.node_id for proxy, _ in results}
        for node in sorted(outcome.sampled - replied):
            reason = f"dropped out: {errors[node]}" if node in errors else "dropped out: no reply in time"
            self._exclude(server_round, outcome, node, reason)
        if self.secure and results:  # SecAgg+ gives every surviving site's result the same unmasked sum
            defect = update_defect(parameters_to_ndarrays(results[0][1].parameters), self.shapes)
            if defect:
                return self._void(server_round, outcome, f"the unmasked SecAgg+ sum is unusable: {defect}")
        elif not self.secure:
            kept = []
            for proxy, res in results:
                defect = update_defect(parameters_to_ndarrays(res.parameters), self.shapes)
                if not defect and res.num_examples <= 0:
                    defect = f"it reports {res.num_examples} training examples"
                if defect:
                    self._exclude(server_round, outcome, proxy.node_id, f"invalid update: {defect}")
                else:
                    kept.append((proxy, res))
            results = kept
        if outcome.excluded and not self.tolerate_missing:
            missing = ", ".join(map(str, sorted(outcome.excluded)))
            return self._void(
                server_round,
                outcome,
                f"site(s) {missing} are missing from the aggregate, and under client-level DP (`dp-mode`) "
                "the noise is sized to every sampled site",
            )
        if not results:
            return self._void(server_round, outcome, "no valid site update arrived")
        parameters, metrics = self.strategy.aggregate_fit(server_round, results, [])
        if parameters is None:
            return self._void(server_round, outcome, "the strategy produced no aggregate")
        defect = update_defect(parameters_to_ndarrays(parameters), self.shapes)
        if defect:
            return self._void(server_round, outcome, f"the aggregate is unusable: {defect}")
        return parameters, metrics

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        """Average the local scores of the sites that replied (a site that dropped out has none)."""
        if failures:
            log.warning(
                "Round %d: %d site(s) failed to evaluate; averaging the other %d.",
                server_round,
                len(failures),
                len(results),
            )
        return self.strategy.aggregate_evaluate(server_round, results, [])

    @staticmethod
    def _exclude(server_round: int, outcome: RoundOutcome, node: int, reason: str) -> None:
        log.warning(
            "Round %d: site node %s is left out of the aggregate: %s.", server_round, node, reason.rstrip(".")
        )
        outcome.excluded[node] = reason

    @staticmethod
    def _void(
        server_round: int, outcome: RoundOutcome, reason: str
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        log.error("Round %d has no aggregate: %s.", server_round, reason)
        outcome.failure = reason
        return None, {}


def make_strategy(
    cfg: FedConfig,
    *,
    initial: list[np.ndarray],
    on_fit_config_fn: ConfigFn,
    on_evaluate_config_fn: ConfigFn,
    evaluate_fn: EvaluateFn | None,
    fit_metrics_fn: MetricsFn = weighted_mean,
) -> Float32Adapter:
    """Build the strategy named by ``cfg.strategy`` around the coordinator's initial adapter (float32 out)."""
    common = dict(
        fraction_fit=cfg.fraction_train,
        fraction_evaluate=cfg.fraction_evaluate,
        min_fit_clients=cfg.min_clients,
        min_evaluate_clients=cfg.min_clients if cfg.fraction_evaluate > 0 else 0,
        min_available_clients=cfg.min_clients,
        evaluate_fn=evaluate_fn,
        on_fit_config_fn=on_fit_config_fn,
        on_evaluate_config_fn=on_evaluate_config_fn,
        accept_failures=False,
        initial_parameters=ndarrays_to_parameters(initial),
        fit_metrics_aggregation_fn=fit_metrics_fn,
        evaluate_metrics_aggregation_fn=weighted_mean,
    )
    return Float32Adapter(_with_dp(cfg, _base_strategy(cfg, common)))


def _with_dp(cfg: FedConfig, strategy: Strategy) -> Strategy:
    """Central DP: Flower's wrapper adds N(0, (sigma C / n)^2) to the average (n set each round)."""
    if cfg.client_dp != "central":
        return strategy
    return DifferentialPrivacyClientSideFixedClipping(
        strategy, cfg.dp_noise_multiplier, cfg.dp_clipping_norm, num_sampled_clients=cfg.min_clients
    )


def _fedopt(cls: type[FedOpt]) -> Callable[[FedConfig, dict], Strategy]:
    def build(cfg: FedConfig, common: dict) -> Strategy:
        return cls(
            **common,
            eta=cfg.fedopt_eta,
            eta_l=cfg.learning_rate,
            beta_1=cfg.fedopt_beta_1,
            beta_2=cfg.fedopt_beta_2,
            tau=cfg.fedopt_tau,
        )

    return build


# `strategy` name -> the Flower strategy built from the run config and the shared settings
STRATEGIES: dict[str, Callable[[FedConfig, dict], Strategy]] = {
    "fedavg": lambda cfg, common: FedAvg(**common),
    "fedprox": lambda cfg, common: FedProx(**common, proximal_mu=cfg.fedprox_mu),
    "fedavgm": lambda cfg, common: FedAvgM(
        **common, server_learning_rate=cfg.fedavgm_lr, server_momentum=cfg.fedavgm_momentum
    ),
    "fedadam": _fedopt(FedAdam),
    "fedyogi": _fedopt(FedYogi),
}


def _base_strategy(cfg: FedConfig, common: dict) -> Strategy:
    if cfg.strategy not in STRATEGIES:
        raise ValueError(f"`strategy` {cfg.strategy!r} is not supported; supported: {', '.join(STRATEGIES)}.")
    return STRATEGIES[cfg.strategy](cfg, common)
