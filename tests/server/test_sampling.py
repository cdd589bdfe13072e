"""Drawing a round's sites ahead: the strategy trains on them, and only they get the base-model check."""

from __future__ import annotations

import random
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from fedtune.server.distribution import SiteTransfer
from fedtune.server.run_state import RoundState
from fedtune.server.sampling import RoundSampler
from fedtune.server.stages import distribute_base_model, draw_round_sites
from flwr.common import ndarrays_to_parameters
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.strategy import FedAvg

PARAMS = ndarrays_to_parameters([np.zeros(2, dtype=np.float32)])


def _manager(cls: type[SimpleClientManager], nodes: int) -> Any:
    manager = cls()
    for node in range(1, nodes + 1):
        manager.register(GridClientProxy(node, None, 1))  # type: ignore[arg-type]
    return manager


def _fedavg(fraction_fit: float, fraction_evaluate: float = 0.0) -> FedAvg:
    return FedAvg(
        fraction_fit=fraction_fit,
        fraction_evaluate=fraction_evaluate,
        min_fit_clients=2,
        min_evaluate_clients=2,
        min_available_clients=2,
    )


def _nodes(pairs: list[tuple[Any, Any]]) -> list[int]:
    return [proxy.node_id for proxy, _ in pairs]


def test_the_strategy_trains_exactly_the_sites_drawn_ahead_and_flower_would_draw_the_same() -> None:
    sampler, plain = _manager(RoundSampler, 1000), _manager(SimpleClientManager, 1000)
    random.seed(3)
    drawn = [p.node_id for p in sampler.draw(10)]
    random.seed(3)
    flower = _nodes(_fedavg(0.01).configure_fit(1, PARAMS, plain))

    # the strategy's sample is the drawn one, in order; and it is the sample Flower's own manager draws
    assert _nodes(_fedavg(0.01).configure_fit(1, PARAMS, sampler)) == drawn == flower
    assert not sampler._drawn  # handed out once
    # a drawn sample is used once: the next round without a draw samples anew
    assert len(_nodes(_fedavg(0.01).configure_fit(2, PARAMS, sampler))) == 10


def test_a_drawn_sample_of_the_wrong_size_is_dropped_and_the_sites_drawn_again() -> None:
    sampler = _manager(RoundSampler, 100)
    sampler.draw(10)
    assert len(sampler.sample(5)) == 5
    assert not sampler._drawn  # dropped, not kept for a later call


def test_a_sample_with_a_criterion_is_drawn_anew_under_it() -> None:
    sampler = _manager(RoundSampler, 100)
    sampler.draw(10)
    odd = SimpleNamespace(select=lambda proxy: proxy.node_id % 2 == 1)
    assert all(p.node_id % 2 == 1 for p in sampler.sample(10, criterion=odd))


def _state(strategy: FedAvg, fraction_evaluate: float, tmp_path: Any) -> Any:
    checked: list[list[int]] = []

    def run(nodes: list[int]) -> list[SiteTransfer]:
        checked.append(nodes)
        return [SiteTransfer(n, "had") for n in nodes]

    return SimpleNamespace(
        cfg=SimpleNamespace(fraction_evaluate=fraction_evaluate),
        strategies=SimpleNamespace(base=strategy),
        rounds=RoundState(),
        distributor=SimpleNamespace(run=run, checked=checked),
        folder=SimpleNamespace(distribution=tmp_path / "base_model_distribution.json"),
        progress=None,
    )


def test_only_the_rounds_sites_get_the_base_model_check_each_once(tmp_path) -> None:
    # Prepare: 40 connected hospitals, a quarter trained per round (rounds 1 and 2 share some sites)
    random.seed(0)
    strategy = _fedavg(0.25)
    context = SimpleNamespace(client_manager=_manager(RoundSampler, 40))
    state = _state(strategy, 0.0, tmp_path)

    # Execute: two rounds of (draw, check, configure_fit)
    trained = []
    for server_round in (1, 2):
        assert draw_round_sites(state, server_round, context)
        assert distribute_base_model(state, server_round, context)
        trained.append(_nodes(strategy.configure_fit(server_round, PARAMS, context.client_manager)))

    # Assert: each round checks its 10 trained sites, none already checked, and no other site
    assert set(trained[0]) & set(trained[1])  # the case that matters: a site sampled twice
    first, second = state.distributor.checked
    assert first == sorted(trained[0])
    assert second == sorted(set(trained[1]) - set(trained[0]))
    assert state.rounds.model_ready == set(trained[0]) | set(trained[1])
    assert (tmp_path / "base_model_distribution.json").is_file()


def test_the_sites_drawn_to_evaluate_are_checked_too_and_then_evaluate(tmp_path) -> None:
    strategy = _fedavg(0.01, fraction_evaluate=0.02)
    context = SimpleNamespace(client_manager=_manager(RoundSampler, 1000))
    state = _state(strategy, 0.02, tmp_path)
    draw_round_sites(state, 1, context)
    distribute_base_model(state, 1, context)

    fit = _nodes(strategy.configure_fit(1, PARAMS, context.client_manager))
    evaluate = _nodes(strategy.configure_evaluate(1, PARAMS, context.client_manager))

    assert (len(fit), len(evaluate)) == (10, 20)
    assert state.rounds.round_sites == sorted(set(fit) | set(evaluate))
    assert state.distributor.checked == [state.rounds.round_sites]


def test_the_stage_refuses_flowers_plain_client_manager() -> None:
    context = SimpleNamespace(client_manager=SimpleClientManager())
    with pytest.raises(TypeError, match="RoundSampler"):
        draw_round_sites(SimpleNamespace(), 1, context)
