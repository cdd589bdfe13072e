"""A server optimiser's checkpoint state: none for FedAvg, a foreign one refused, a restored one continues."""

from __future__ import annotations

import numpy as np
import pytest
from fedtune.common.config import FedConfig
from fedtune.server.strategy import make_strategy
from fedtune.server.strategy_state import restore_strategy_state, strategy_state
from flwr.common import parameters_to_ndarrays
from flwr.server.strategy import Strategy
from server_strategies import SHAPES, fedadam, fit_results


def test_fedavg_has_no_state_and_a_foreign_state_is_refused() -> None:
    # Prepare
    fedavg = make_strategy(
        FedConfig(strategy="fedavg"), initial=[np.zeros(3, np.float32)], on_fit_config_fn=dict,
        on_evaluate_config_fn=dict,
        evaluate_fn=None,
    ).strategy  # fmt: skip
    adam, _ = fedadam()

    # Execute / Assert
    assert strategy_state(fedavg) == {}
    with pytest.raises(ValueError, match="does not belong to a FedAvg strategy"):
        restore_strategy_state(fedavg, {"m_t": [np.zeros(3)]})
    with pytest.raises(ValueError, match="lacks FedAdam's `current_weights`"):
        restore_strategy_state(adam, {})


@pytest.mark.parametrize(
    "cfg",
    [
        FedConfig(strategy="fedavgm", fedavgm_lr=0.8, fedavgm_momentum=0.9),
        FedConfig(strategy="fedyogi", fedopt_eta=0.05, fedopt_tau=1e-3),
    ],
    ids=["fedavgm", "fedyogi"],
)
def test_a_server_optimiser_restored_from_its_state_takes_the_next_round_exactly(cfg: FedConfig) -> None:
    # Prepare: two rounds, then the state through JSON-free arrays as the checkpoint keeps it
    def build() -> Strategy:
        initial = [np.full(s, 0.5, np.float32) for s in SHAPES]
        return make_strategy(
            cfg, initial=initial, on_fit_config_fn=dict, on_evaluate_config_fn=dict, evaluate_fn=None
        ).strategy

    strategy = build()
    for server_round in (1, 2):
        strategy.aggregate_fit(server_round, fit_results(server_round), [])
    state = strategy_state(strategy)

    # Execute
    fresh = build()
    restore_strategy_state(fresh, state)
    want, _ = strategy.aggregate_fit(3, fit_results(3), [])
    got, _ = fresh.aggregate_fit(3, fit_results(3), [])

    # Assert
    assert state and all(state.values())
    for a, b in zip(parameters_to_ndarrays(got), parameters_to_ndarrays(want), strict=True):
        np.testing.assert_array_equal(a, b)
    unrestored, _ = build().aggregate_fit(1, fit_results(3), [])  # the same results without the history
    assert any(
        not np.array_equal(a, b)
        for a, b in zip(parameters_to_ndarrays(unrestored), parameters_to_ndarrays(want), strict=True)
    )
