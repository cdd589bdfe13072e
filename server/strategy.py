"""Aggregation strategies for the adapter: Flower's own FedAvg, FedProx and FedAdam.

FedAvg averages the sites' adapters weighted by training examples; FedProx is the same
on the server and sends ``proximal_mu`` so sites add the proximal term; FedAdam runs a
server Adam step on the averaged update. All three work unchanged under SecAgg+, which
hands them one already-averaged result.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from fedtune.common.config import FedConfig
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
    FedProx,
    Strategy,
)

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


class Float32Adapter(Strategy):
    """Wrap a strategy so the aggregated adapter stays float32.

    SecAgg+ dequantises into float64 and FedAdam's maths promotes to float64; without this the
    next round would broadcast twice the adapter's bytes.
    """

    def __init__(self, strategy: Strategy) -> None:
        self.strategy = strategy

    def __repr__(self) -> str:
        return f"Float32Adapter({self.strategy!r})"

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:  # noqa: D102
        return self.strategy.initialize_parameters(client_manager)

    def configure_fit(  # noqa: D102
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        return self.strategy.configure_fit(server_round, parameters, client_manager)

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
    if cfg.dp_mode != "central":
        return strategy
    return DifferentialPrivacyClientSideFixedClipping(
        strategy, cfg.dp_noise_multiplier, cfg.dp_clipping_norm, num_sampled_clients=cfg.min_clients
    )


def _base_strategy(cfg: FedConfig, common: dict) -> Strategy:
    if cfg.strategy == "fedavg":
        return FedAvg(**common)
    if cfg.strategy == "fedprox":
        return FedProx(**common, proximal_mu=cfg.fedprox_mu)
    if cfg.strategy == "fedadam":
        return FedAdam(
            **common,
            eta=cfg.fedadam_eta,
            eta_l=cfg.learning_rate,
            beta_1=cfg.fedadam_beta_1,
            beta_2=cfg.fedadam_beta_2,
            tau=cfg.fedadam_tau,
        )
    raise ValueError(f"`strategy` {cfg.strategy!r} is not supported; supported: fedavg, fedprox, fedadam.")
