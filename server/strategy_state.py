"""The server optimiser's state, saved in a checkpoint and set again on resume.

FedAdam and FedYogi (Flower's ``FedOpt``) keep their current weights and both moments; FedAvgM keeps
its current weights and momentum vector. FedAvg keeps nothing between rounds.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.common import Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.strategy import FedAvgM, FedOpt, Strategy

FEDOPT_STATE = ("current_weights", "m_t", "v_t")
FEDAVGM_STATE = ("initial_parameters", "momentum_vector")  # FedAvgM keeps its current weights here


def _state_names(strategy: Strategy) -> tuple[str, ...]:
    if isinstance(strategy, FedOpt):
        return FEDOPT_STATE
    if isinstance(strategy, FedAvgM):
        return FEDAVGM_STATE
    return ()


def strategy_state(strategy: Strategy) -> dict[str, list[np.ndarray]]:
    """The server optimiser's state; ``{}`` for a strategy without one.

    FedAdam / FedYogi: ``current_weights``, ``m_t``, ``v_t``; FedAvgM: its current weights
    (``initial_parameters``) and ``momentum_vector``.

    Only the state set so far is returned (the moments appear after the first aggregation).
    """
    out = {}
    for name in _state_names(strategy):
        value = getattr(strategy, name)
        if isinstance(value, Parameters):
            value = parameters_to_ndarrays(value)
        if value is not None:
            out[name] = [np.asarray(a) for a in value]
    return out


def restore_strategy_state(strategy: Strategy, state: Mapping[str, list[np.ndarray]]) -> None:
    """Set the optimiser state saved by :func:`strategy_state` on ``strategy``.

    Raises
    ------
    ValueError
        When the state does not belong to this kind of strategy (names what is missing or extra).
    """
    names = _state_names(strategy)
    extra = sorted(set(state) - set(names))
    if extra:
        raise ValueError(
            f"Checkpointed strategy state {extra} does not belong to a {type(strategy).__name__} strategy; "
            "resume with the `strategy` the run started with."
        )
    if names and names[0] not in state:
        raise ValueError(
            f"Checkpointed state lacks {type(strategy).__name__}'s `{names[0]}`; it was written by "
            "another strategy."
        )
    for name in names:
        value = [np.array(a) for a in state[name]] if name in state else None
        if name == "initial_parameters" and value is not None:
            value = ndarrays_to_parameters(value)
        setattr(strategy, name, value)
