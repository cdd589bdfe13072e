"""Shared test helpers: a FedAdam strategy over tiny arrays and seeded fit results of two sites."""

from __future__ import annotations

from unittest.mock import Mock

import numpy as np
from fedtune.common.config import FedConfig
from fedtune.server.strategy import make_strategy
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

SHAPES = [(2, 3), (4,)]


def fedadam() -> tuple[Strategy, list[np.ndarray]]:
    """``(Flower's FedAdam as fedtune builds it, its initial arrays)``."""
    initial = [np.full(s, 0.5, np.float32) for s in SHAPES]
    wrapped = make_strategy(
        FedConfig(strategy="fedadam", fedopt_eta=0.1, fedopt_tau=1e-3),
        initial=initial,
        on_fit_config_fn=lambda r: {},
        on_evaluate_config_fn=lambda r: {},
        evaluate_fn=None,
    )
    return wrapped.strategy, initial


def fit_results(seed: int) -> list[tuple[ClientProxy, FitRes]]:
    """Two sites' seeded updates of :data:`SHAPES` (10 and 30 examples)."""
    rng = np.random.default_rng(seed)
    out = []
    for node, n in ((1, 10), (2, 30)):
        proxy = Mock(spec=ClientProxy)
        proxy.node_id = node
        arrays = [rng.normal(0, 1, s).astype(np.float32) for s in SHAPES]
        out.append((proxy, FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters(arrays), n, {})))
    return out
