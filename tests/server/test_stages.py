"""The coordinator's round stages, one at a time, on a stand-in run state (no federation needed)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from fedtune.common.records import RoundRecord
from fedtune.server import stages
from fedtune.server.run_state import RoundState
from fedtune.server.stages import record_round, run_stages


def _state(rounds: RoundState) -> Any:
    wire = {"up": {7: 300, 9: 100}, "down": {7: 50, 9: 50}}
    return SimpleNamespace(
        rounds=rounds,
        grid=SimpleNamespace(round_bytes=lambda server_round: wire),
        strategies=SimpleNamespace(guard=SimpleNamespace(outcomes={})),
        accountant=None,
    )


def _context(server_round: int) -> Any:
    history = SimpleNamespace(
        metrics_centralized={"accuracy": [(server_round, 0.5)], "macro_f1": [(server_round, 0.25)]},
        metrics_distributed={},
        metrics_distributed_fit={"train_loss": [(server_round - 1, 9.0), (server_round, 1.5)]},
    )
    return SimpleNamespace(history=history)


def test_each_round_record_holds_that_rounds_figures_and_its_own_seconds(monkeypatch) -> None:
    # Prepare: a clock read at 10 s and 25 s when rounds 1 and 2 end; the run started at 0 s
    clock = iter([10.0, 25.0])
    monkeypatch.setattr(stages.time, "perf_counter", lambda: next(clock))
    state = _state(RoundState(round_start=0.0, site_examples=[40, 60]))

    # Execute
    for server_round in (1, 2):
        assert record_round(state, server_round, _context(server_round)) is True

    # Assert: seconds per round, not since the start; bytes summed over sites and kept per site
    first, second = state.rounds.records
    assert (first.seconds, second.seconds) == (10.0, 15.0)
    assert second == RoundRecord(
        round=2,
        accuracy=0.5,
        macro_f1=0.25,
        train_loss=1.5,
        site_train_examples=[40, 60],
        bytes_up=400,
        bytes_down=100,
        bytes_up_per_site={"7": 300, "9": 100},
        bytes_down_per_site={"7": 50, "9": 50},
        seconds=15.0,
    )


def test_stages_run_in_order_until_one_says_stop() -> None:
    called = []

    def stage(name: str, go_on: bool) -> Any:
        return lambda state, server_round, context: called.append(name) or go_on

    assert run_stages([stage("a", True), stage("b", True)], None, 1, None) is True
    assert run_stages([stage("c", False), stage("d", True)], None, 1, None) is False
    assert called == ["a", "b", "c"]


@pytest.mark.parametrize(
    ("target", "exceeds", "go_on"), [(0.0, True, True), (8.0, False, True), (8.0, True, False)]
)
def test_the_privacy_budget_stops_the_run_before_a_round_that_would_pass_it(
    target: float, exceeds: bool, go_on: bool
) -> None:
    # Prepare
    accountant = SimpleNamespace(would_exceed=lambda eps, q: exceeds)
    state = SimpleNamespace(
        cfg=SimpleNamespace(dp_target_epsilon=target), accountant=accountant, rounds=RoundState()
    )

    # Execute / Assert
    assert stages.stop_at_privacy_budget(state, 3, None) is go_on
    assert state.rounds.stopped_early == (
        "" if go_on else "stopped before round 3: it would take epsilon past `dp-target-epsilon` 8"
    )


def test_a_rounds_patient_level_figures_are_its_own_and_not_carried_into_the_next_round() -> None:
    # Prepare: sites 0 and 1 trained with DP-SGD in round 1; nobody did in round 2
    state = _state(RoundState(round_start=0.0, site_examples=[40, 60]))
    state.rounds.site_example_dp = {
        "1": {"epsilon": 2.5, "sigma": 1.1, "steps": 30.0, "q": 0.1},
        "0": {"epsilon": 3.0, "sigma": 1.1, "steps": 30.0, "q": 0.2},
    }

    # Execute
    record_round(state, 1, _context(1))
    record_round(state, 2, _context(2))

    # Assert: round 1 holds the largest epsilon and each site in order; round 2 holds none
    first, second = state.rounds.records
    assert first.example_dp_epsilon == 3.0 and list(first.sites_example_dp) == ["0", "1"]
    assert second.example_dp_epsilon is None and second.sites_example_dp is None
    assert state.rounds.site_example_dp == {}


def test_a_generative_rounds_scores_are_recorded_under_their_own_names() -> None:
    # Prepare: the coordinator's and the sites' evaluation of generated answers
    context = _context(1)
    context.history.metrics_centralized = {
        "loss": [(1, 1.25)],
        "exact_match": [(1, 0.1)],
        "category_match": [(1, 0.4)],
        "valid_code": [(1, 0.9)],
    }
    context.history.metrics_distributed = {"category_match": [(1, 0.35)], "exact_match": [(1, 0.05)]}
    state = _state(RoundState(round_start=0.0))

    # Execute
    record_round(state, 1, context)

    # Assert
    r = state.rounds.records[0]
    assert (r.loss, r.exact_match, r.category_match, r.valid_code) == (1.25, 0.1, 0.4, 0.9)
    assert (r.sites_category_match, r.sites_exact_match) == (0.35, 0.05)
    assert r.accuracy is None and r.macro_f1 is None
