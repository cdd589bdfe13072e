"""Tests of fedtune.server.strategy: metric averaging, strategy choice, and Flower's aggregation maths."""

from __future__ import annotations

from typing import Any
from unittest.mock import Mock

import numpy as np
import pytest
from fedtune.common.config import FedConfig
from fedtune.server.strategy import Float32Adapter, RoundOutcome, UpdateGuard, make_strategy, weighted_mean
from fedtune.server.wire import ERROR_CHARS, error_summary
from flwr.common import (
    Code,
    FitRes,
    Metrics,
    Parameters,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAdam, FedAvg, FedAvgM, FedProx, FedYogi, Strategy

INITIAL = [np.array([[0.0, 1.0], [2.0, -1.0]], np.float32), np.array([0.5, -0.5, 0.0], np.float32)]


def _fit_config(server_round: int) -> dict[str, Any]:
    return {"fedtune.round": server_round, "note": "fit"}


def _evaluate_config(server_round: int) -> dict[str, Any]:
    return {"fedtune.round": server_round, "note": "evaluate"}


def _wrapped(cfg: FedConfig, evaluate_fn: Any = None) -> Float32Adapter:
    strategy = make_strategy(
        cfg,
        initial=INITIAL,
        on_fit_config_fn=_fit_config,
        on_evaluate_config_fn=_evaluate_config,
        evaluate_fn=evaluate_fn,
    )
    assert isinstance(strategy, Float32Adapter)
    return strategy


def _strategy(cfg: FedConfig, evaluate_fn: Any = None) -> Strategy:
    return _wrapped(cfg, evaluate_fn).strategy


def _proxy(cid: str) -> ClientProxy:
    proxy = Mock(spec=ClientProxy)
    proxy.cid = cid
    return proxy


def _fit_res(arrays: list[np.ndarray], num_examples: int, metrics: Metrics) -> FitRes:
    return FitRes(
        status=Status(code=Code.OK, message="ok"),
        parameters=ndarrays_to_parameters(arrays),
        num_examples=num_examples,
        metrics=metrics,
    )


def _results(sites: list[tuple[list[np.ndarray], int, Metrics]]) -> list[tuple[ClientProxy, FitRes]]:
    return [(_proxy(str(i)), _fit_res(a, n, m)) for i, (a, n, m) in enumerate(sites)]


SITE_A = ([np.array([[1.0, 2.0], [3.0, 4.0]], np.float32), np.array([0.0, 4.0, -8.0], np.float32)], 1)
SITE_B = ([np.array([[5.0, 6.0], [7.0, 8.0]], np.float32), np.array([4.0, 0.0, 8.0], np.float32)], 3)
# example-weighted (1 x A + 3 x B) / 4
MEAN_AB = [np.array([[4.0, 5.0], [6.0, 7.0]]), np.array([3.0, 1.0, 4.0])]


# ---- weighted_mean -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("results", "expected"),
    [
        ([], {}),
        ([(10, {"acc": 0.5})], {"acc": 0.5}),
        ([(10, {"acc": 0.5}), (30, {"acc": 0.9})], {"acc": 0.8}),
        ([(1, {"loss": 2.0, "acc": 1.0}), (3, {"loss": 6})], {"loss": 5.0, "acc": 1.0}),
        ([(0, {"acc": 100.0}), (10, {"acc": 0.5})], {"acc": 0.5}),
        ([(0, {"acc": 1.0}), (0, {"acc": 0.0})], {}),
        ([(2, {"acc": 0.5, "name": "site-a"}), (2, {"acc": 1.0, "name": "site-b"})], {"acc": 0.75}),
    ],
)
def test_weighted_mean(results: list[tuple[int, Metrics]], expected: dict[str, float]) -> None:
    # Prepare / Execute
    out = weighted_mean(results)

    # Assert
    assert out == pytest.approx(expected)
    assert set(out) == set(expected)


# ---- make_strategy ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("fedavg", FedAvg),
        ("fedprox", FedProx),
        ("fedavgm", FedAvgM),
        ("fedadam", FedAdam),
        ("fedyogi", FedYogi),
    ],
)
def test_make_strategy_by_name(name: str, cls: type[Strategy]) -> None:
    # Prepare
    cfg = FedConfig(strategy=name, min_clients=3, fraction_train=0.5, fraction_evaluate=0.25)

    # Execute
    strategy = _strategy(cfg)

    # Assert
    assert type(strategy) is cls
    assert strategy.fraction_fit == 0.5 and strategy.fraction_evaluate == 0.25
    assert strategy.min_fit_clients == strategy.min_available_clients == strategy.min_evaluate_clients == 3
    assert strategy.accept_failures is False
    assert strategy.fit_metrics_aggregation_fn is weighted_mean
    assert strategy.evaluate_metrics_aggregation_fn is weighted_mean
    initial = parameters_to_ndarrays(strategy.initialize_parameters(client_manager=SimpleClientManager()))
    assert all(np.array_equal(a, b) for a, b in zip(initial, INITIAL, strict=True))


def test_make_strategy_passes_algorithm_settings() -> None:
    # Prepare
    prox_cfg = FedConfig(strategy="fedprox", fedprox_mu=0.3)
    adam_cfg = FedConfig(
        strategy="fedadam", fedopt_eta=0.05, fedopt_beta_1=0.8, fedopt_beta_2=0.95, fedopt_tau=1e-4
    )
    avgm_cfg = FedConfig(strategy="fedavgm", fedavgm_lr=0.7, fedavgm_momentum=0.3)
    yogi_cfg = FedConfig(strategy="fedyogi", fedopt_eta=0.02, fedopt_tau=1e-5)

    # Execute
    prox, adam, avgm, yogi = (_strategy(c) for c in (prox_cfg, adam_cfg, avgm_cfg, yogi_cfg))

    # Assert
    assert prox.proximal_mu == 0.3
    assert (avgm.server_learning_rate, avgm.server_momentum) == (0.7, 0.3)
    assert (yogi.eta, yogi.tau) == (0.02, 1e-5)
    assert (adam.eta, adam.eta_l, adam.beta_1, adam.beta_2, adam.tau) == (
        0.05,
        adam_cfg.learning_rate,
        0.8,
        0.95,
        1e-4,
    )


def test_no_evaluation_needs_no_evaluate_clients() -> None:
    # Prepare / Execute
    strategy = _strategy(FedConfig(fraction_evaluate=0.0, min_clients=4))

    # Assert
    assert strategy.min_evaluate_clients == 0
    assert strategy.min_fit_clients == 4


def test_unknown_strategy_is_refused() -> None:
    # Prepare
    cfg = FedConfig(strategy="scaffold")  # type: ignore[arg-type] - direct construction skips the parser

    # Execute / Assert
    with pytest.raises(ValueError, match="fedavg, fedprox, fedavgm, fedadam, fedyogi"):
        _strategy(cfg)


def test_centralised_evaluate_fn_is_wired() -> None:
    # Prepare
    calls: list[tuple[int, int]] = []

    def evaluate_fn(
        server_round: int, arrays: list[np.ndarray], config: dict[str, Any]
    ) -> tuple[float, dict]:
        calls.append((server_round, len(arrays)))
        return 0.25, {"accuracy": 0.75}

    strategy = _strategy(FedConfig(), evaluate_fn=evaluate_fn)

    # Execute
    out = strategy.evaluate(2, ndarrays_to_parameters(INITIAL))

    # Assert
    assert out == (0.25, {"accuracy": 0.75})
    assert calls == [(2, len(INITIAL))]


# ---- aggregate_fit ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["fedavg", "fedprox"])
def test_fedavg_and_fedprox_average_weighted_by_examples(name: str) -> None:
    # Prepare
    strategy = _strategy(FedConfig(strategy=name))
    results = _results(
        [(SITE_A[0], SITE_A[1], {"train_loss": 0.4}), (SITE_B[0], SITE_B[1], {"train_loss": 0.8})]
    )

    # Execute
    parameters, metrics = strategy.aggregate_fit(1, results, [])

    # Assert
    assert isinstance(parameters, Parameters)
    aggregated = parameters_to_ndarrays(parameters)
    assert len(aggregated) == len(MEAN_AB)
    for got, want in zip(aggregated, MEAN_AB, strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert metrics == pytest.approx({"train_loss": 0.7})


def test_a_failed_site_voids_the_round() -> None:
    # Prepare
    strategy = _strategy(FedConfig())
    results = _results([(SITE_A[0], SITE_A[1], {})])

    # Execute
    parameters, metrics = strategy.aggregate_fit(1, results, [RuntimeError("site crashed")])

    # Assert
    assert parameters is None and metrics == {}


def test_fedprox_sends_proximal_mu_with_the_fit_config() -> None:
    # Prepare
    strategy = _strategy(FedConfig(strategy="fedprox", fedprox_mu=0.25, min_clients=2))
    manager = SimpleClientManager()
    for cid in ("a", "b", "c"):
        manager.register(_proxy(cid))

    # Execute
    pairs = strategy.configure_fit(3, ndarrays_to_parameters(INITIAL), manager)

    # Assert
    assert len(pairs) == 3
    assert {proxy.cid for proxy, _ in pairs} == {"a", "b", "c"}
    for _, fit_ins in pairs:
        assert fit_ins.config == {"fedtune.round": 3, "note": "fit", "proximal_mu": 0.25}
        sent = parameters_to_ndarrays(fit_ins.parameters)
        assert all(np.array_equal(a, b) for a, b in zip(sent, INITIAL, strict=True))


def test_fedavg_fit_config_has_no_proximal_mu() -> None:
    # Prepare
    strategy = _strategy(FedConfig(strategy="fedavg", fraction_train=0.5, min_clients=2))
    manager = SimpleClientManager()
    for cid in ("a", "b", "c", "d"):
        manager.register(_proxy(cid))

    # Execute
    pairs = strategy.configure_fit(1, ndarrays_to_parameters(INITIAL), manager)

    # Assert
    assert len(pairs) == 2
    assert all(fit_ins.config == {"fedtune.round": 1, "note": "fit"} for _, fit_ins in pairs)


def test_fedadam_takes_a_server_adam_step_from_the_initial_adapter() -> None:
    # Prepare
    cfg = FedConfig(
        strategy="fedadam", fedopt_eta=0.1, fedopt_beta_1=0.9, fedopt_beta_2=0.99, fedopt_tau=1e-3
    )
    strategy = _strategy(cfg)
    rounds = [
        _results([(SITE_A[0], SITE_A[1], {}), (SITE_B[0], SITE_B[1], {})]),
        _results([(SITE_B[0], 2, {}), (SITE_A[0], 2, {})]),
    ]
    b1, b2, eta, tau = cfg.fedopt_beta_1, cfg.fedopt_beta_2, cfg.fedopt_eta, cfg.fedopt_tau
    weights = [a.astype(np.float64) for a in INITIAL]
    m = [np.zeros_like(w) for w in weights]
    v = [np.zeros_like(w) for w in weights]

    for server_round, results in enumerate(rounds, start=1):
        # Execute
        parameters, _ = strategy.aggregate_fit(server_round, results, [])

        # Assert: flwr's FedAdam on the example-weighted mean (its bias correction uses round + 1)
        total = sum(res.num_examples for _, res in results)
        mean = [
            sum(res.num_examples * parameters_to_ndarrays(res.parameters)[i] for _, res in results) / total
            for i in range(len(weights))
        ]
        delta = [x - w for x, w in zip(mean, weights, strict=True)]
        m = [b1 * mi + (1 - b1) * d for mi, d in zip(m, delta, strict=True)]
        v = [b2 * vi + (1 - b2) * d * d for vi, d in zip(v, delta, strict=True)]
        eta_norm = eta * np.sqrt(1 - b2 ** (server_round + 1)) / (1 - b1 ** (server_round + 1))
        weights = [w + eta_norm * mi / (np.sqrt(vi) + tau) for w, mi, vi in zip(weights, m, v, strict=True)]
        got = parameters_to_ndarrays(parameters)
        assert len(got) == len(weights)
        for g, w in zip(got, weights, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
        assert not all(np.allclose(g, x) for g, x in zip(got, mean, strict=True))  # not plain FedAvg


@pytest.mark.parametrize("name", ["fedavg", "fedadam"])
def test_aggregate_stays_float32_when_results_arrive_as_float64(name: str) -> None:
    # Prepare: SecAgg+ hands the strategy dequantised float64 vectors
    strategy = _wrapped(FedConfig(strategy=name))
    results = [(_proxy("a"), _fit_res([a.astype(np.float64) + 1 for a in INITIAL], 10, {"train_loss": 1.0}))]

    # Execute
    parameters, _ = strategy.aggregate_fit(1, results, [])

    # Assert
    out = parameters_to_ndarrays(parameters)
    assert all(a.dtype == np.float32 for a in out) and [a.shape for a in out] == [a.shape for a in INITIAL]


# ---- UpdateGuard: bad and missing updates --------------------------------------------------------------

SHAPES = [a.shape for a in INITIAL]


def _node(node_id: int) -> ClientProxy:
    proxy = Mock(spec=ClientProxy)
    proxy.node_id = node_id
    return proxy


def _guarded(
    *, secure: bool = False, tolerate_missing: bool = True, failed: dict[int, str] | None = None, sampled=()
) -> UpdateGuard:
    guard = UpdateGuard(
        _wrapped(FedConfig()),
        SHAPES,
        secure=secure,
        tolerate_missing=tolerate_missing,
        failed_replies=lambda server_round: failed or {},
    )
    guard.outcomes[1] = RoundOutcome(sampled=set(sampled))
    return guard


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ([np.full((2, 2), np.nan, np.float32), INITIAL[1]], "tensor 0 holds non-finite values (NaN/Inf)"),
        (
            [INITIAL[0], np.array([np.inf, 0.0, 0.0], np.float32)],
            "tensor 1 holds non-finite values (NaN/Inf)",
        ),
        ([np.zeros((2, 3), np.float32), INITIAL[1]], "tensor 0 has shape (2, 3), the adapter's is (2, 2)"),
        ([INITIAL[0]], "it has 1 tensors, the adapter has 2"),
    ],
)
def test_a_bad_update_is_excluded_and_named_in_the_log(
    bad: list[np.ndarray], reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: node 7 sends a bad update, nodes 5 and 6 good ones
    guard = _guarded(sampled=(5, 6, 7))
    results = [
        (_node(5), _fit_res(SITE_A[0], SITE_A[1], {"train_loss": 0.4})),
        (_node(7), _fit_res(bad, 1000, {"train_loss": 99.0})),
        (_node(6), _fit_res(SITE_B[0], SITE_B[1], {"train_loss": 0.8})),
    ]

    # Execute
    with caplog.at_level("WARNING", logger="fedtune.server.strategy"):
        parameters, metrics = guard.aggregate_fit(1, results, [])

    # Assert: the round aggregates the two good sites only, and says whom it left out and why
    for got, want in zip(parameters_to_ndarrays(parameters), MEAN_AB, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-6)
    assert metrics == pytest.approx({"train_loss": 0.7})
    assert guard.outcomes[1].excluded == {7: f"invalid update: {reason}"}
    assert f"Round 1: site node 7 is left out of the aggregate: invalid update: {reason}." in caplog.messages


def test_a_site_that_dropped_out_is_left_out_with_its_error() -> None:
    # Prepare: node 6 answered with an error, node 8 not at all; SecAgg+ hands the others the unmasked sum
    guard = _guarded(secure=True, failed={6: "ClientAppException: out of memory"}, sampled=(5, 6, 7, 8))
    total = [np.ones((2, 2), np.float32), np.zeros(3, np.float32)]
    results = [(_node(5), _fit_res(total, 10, {})), (_node(7), _fit_res(total, 30, {}))]

    # Execute
    parameters, _ = guard.aggregate_fit(1, results, [RuntimeError("node 6 failed")])

    # Assert
    assert parameters is not None
    assert guard.outcomes[1].excluded == {
        6: "dropped out: ClientAppException: out of memory",
        8: "dropped out: no reply in time",
    }


def test_under_dp_a_missing_site_voids_the_round() -> None:
    # Prepare
    guard = _guarded(tolerate_missing=False, sampled=(5, 6))

    # Execute
    parameters, metrics = guard.aggregate_fit(1, [(_node(5), _fit_res(SITE_A[0], SITE_A[1], {}))], [])

    # Assert
    assert (parameters, metrics) == (None, {})
    assert "site(s) 6 are missing" in guard.outcomes[1].failure and "`dp-mode`" in guard.outcomes[1].failure


def test_a_non_finite_secagg_sum_voids_the_round(caplog: pytest.LogCaptureFixture) -> None:
    # Prepare
    guard = _guarded(secure=True, sampled=(5, 6))
    total = [np.full((2, 2), np.nan), np.zeros(3)]
    results = [(_node(5), _fit_res(total, 10, {})), (_node(6), _fit_res(total, 30, {}))]

    # Execute
    with caplog.at_level("ERROR", logger="fedtune.server.strategy"):
        parameters, _ = guard.aggregate_fit(1, results, [])

    # Assert
    assert parameters is None
    assert (
        guard.outcomes[1].failure
        == "the unmasked SecAgg+ sum is unusable: tensor 0 holds non-finite values (NaN/Inf)"
    )
    assert any("Round 1 has no aggregate" in m for m in caplog.messages)


def test_when_every_update_is_bad_the_round_has_no_aggregate() -> None:
    # Prepare
    guard = _guarded(sampled=(5,))

    # Execute
    parameters, _ = guard.aggregate_fit(1, [(_node(5), _fit_res(SITE_A[0], 0, {}))], [])

    # Assert
    assert parameters is None and guard.outcomes[1].failure == "no valid site update arrived"
    assert guard.outcomes[1].excluded == {5: "invalid update: it reports 0 training examples"}


def test_the_guard_remembers_whom_it_sampled() -> None:
    # Prepare
    guard = UpdateGuard(_wrapped(FedConfig(min_clients=2)), SHAPES, secure=False, tolerate_missing=True)
    manager = SimpleClientManager()
    for node in (11, 12):
        proxy = _node(node)
        proxy.cid = str(node)
        manager.register(proxy)

    # Execute
    guard.configure_fit(4, ndarrays_to_parameters(INITIAL), manager)

    # Assert
    assert guard.outcomes[4].sampled == {11, 12}


def test_an_error_reply_is_summarised_on_one_line_keeping_the_sites_message() -> None:
    # Prepare: a Ray traceback as simulation sends it back, colour codes included
    frames = " ".join(f'File "/x/flwr/mod{i}.py", line {i}, in call\n    return f()\n' for i in range(40))
    reason = f"<class 'ray.exceptions.RayTaskError'>:<'\x1b[36mray::ClientAppActor.run()\x1b[39m {frames}\n"
    reason += "ValueError: Node 7 refuses to mask its update: tensor 0 holds non-finite values (NaN/Inf).'>"

    # Execute
    summary = error_summary(reason)

    # Assert
    assert summary.startswith("...") and len(summary) == 3 + ERROR_CHARS
    assert summary.endswith(
        "Node 7 refuses to mask its update: tensor 0 holds non-finite values (NaN/Inf).'>"
    )
    assert "\n" not in summary and "\x1b" not in summary
    assert (
        error_summary("<class 'Exception'>:<'node\n unavailable'>")
        == "<class 'Exception'>:<'node unavailable'>"
    )


def _two_rounds() -> list[list[tuple[ClientProxy, FitRes]]]:
    return [
        _results([(SITE_A[0], SITE_A[1], {}), (SITE_B[0], SITE_B[1], {})]),
        _results([(SITE_B[0], 2, {}), (SITE_A[0], 2, {})]),
    ]


def _mean(results: list[tuple[ClientProxy, FitRes]]) -> list[np.ndarray]:
    total = sum(res.num_examples for _, res in results)
    return [
        sum(res.num_examples * parameters_to_ndarrays(res.parameters)[i] for _, res in results) / total
        for i in range(len(INITIAL))
    ]


def test_fedavgm_takes_a_server_sgd_step_with_momentum() -> None:
    # Prepare
    lr, beta = 0.5, 0.9
    strategy = _strategy(FedConfig(strategy="fedavgm", fedavgm_lr=lr, fedavgm_momentum=beta))
    weights = [a.astype(np.float64) for a in INITIAL]
    momentum: list[np.ndarray] | None = None

    for server_round, results in enumerate(_two_rounds(), start=1):
        # Execute
        parameters, _ = strategy.aggregate_fit(server_round, results, [])

        # Assert: pseudo-gradient g = w - mean; m = beta m + g (m = g in round 1); w <- w - lr m
        grad = [w - x for w, x in zip(weights, _mean(results), strict=True)]
        momentum = grad if momentum is None else [beta * m + g for m, g in zip(momentum, grad, strict=True)]
        weights = [w - lr * m for w, m in zip(weights, momentum, strict=True)]
        for got, want in zip(parameters_to_ndarrays(parameters), weights, strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(weights[0], _mean(_two_rounds()[1])[0])  # not plain FedAvg


def test_fedavgm_at_rate_one_without_momentum_is_fedavg() -> None:
    strategy = _strategy(FedConfig(strategy="fedavgm", fedavgm_lr=1.0, fedavgm_momentum=0.0))
    results = _two_rounds()[0]
    parameters, _ = strategy.aggregate_fit(1, results, [])
    for got, want in zip(parameters_to_ndarrays(parameters), MEAN_AB, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6)


def test_fedyogi_takes_a_server_yogi_step() -> None:
    # Prepare
    cfg = FedConfig(
        strategy="fedyogi", fedopt_eta=0.1, fedopt_beta_1=0.9, fedopt_beta_2=0.99, fedopt_tau=1e-3
    )
    strategy = _strategy(cfg)
    b1, b2, eta, tau = cfg.fedopt_beta_1, cfg.fedopt_beta_2, cfg.fedopt_eta, cfg.fedopt_tau
    weights = [a.astype(np.float64) for a in INITIAL]
    m = [np.zeros_like(w) for w in weights]
    v = [np.zeros_like(w) for w in weights]

    for server_round, results in enumerate(_two_rounds(), start=1):
        # Execute
        parameters, _ = strategy.aggregate_fit(server_round, results, [])

        # Assert: Yogi's v <- v - (1 - b2) d^2 sign(v - d^2); no bias correction in flwr's FedYogi
        delta = [x - w for x, w in zip(_mean(results), weights, strict=True)]
        m = [b1 * mi + (1 - b1) * d for mi, d in zip(m, delta, strict=True)]
        v = [vi - (1 - b2) * d * d * np.sign(vi - d * d) for vi, d in zip(v, delta, strict=True)]
        weights = [w + eta * mi / (np.sqrt(vi) + tau) for w, mi, vi in zip(weights, m, v, strict=True)]
        for got, want in zip(parameters_to_ndarrays(parameters), weights, strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
