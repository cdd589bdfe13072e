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
from flwr.common import Metrics, Scalar, ndarrays_to_parameters
from flwr.server.strategy import FedAdam, FedAvg, FedProx, Strategy

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


def make_strategy(
    cfg: FedConfig,
    *,
    initial: list[np.ndarray],
    on_fit_config_fn: ConfigFn,
    on_evaluate_config_fn: ConfigFn,
    evaluate_fn: EvaluateFn | None,
    fit_metrics_fn: MetricsFn = weighted_mean,
) -> Strategy:
    """Build the strategy named by ``cfg.strategy`` around the coordinator's initial adapter."""
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
