"""Tests of fedtune.common.privacy: ε against dp-accounting, pinned values, monotonicity, calibration,
the bookkeeping accountant and its saved state, and input errors."""

from __future__ import annotations

import collections
import importlib.metadata
import json
import logging
import math
from collections.abc import Callable

import dp_accounting
import pytest
from fedtune.common.privacy import (
    ACCOUNTANTS,
    PrivacyAccountant,
    compute_epsilon,
    noise_for_epsilon,
)

DELTA = 1e-5


def _direct_epsilon(noise_multiplier: float, sampling_rate: float, rounds: int, accountant: str) -> float:
    """ε computed with dp-accounting alone, as the task describes the mechanism."""
    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
    event = gaussian if sampling_rate == 1 else dp_accounting.PoissonSampledDpEvent(sampling_rate, gaussian)
    acc = dp_accounting.rdp.RdpAccountant() if accountant == "rdp" else dp_accounting.pld.PLDAccountant()
    return acc.compose(dp_accounting.SelfComposedDpEvent(event, rounds)).get_epsilon(DELTA)


def _recipe_epsilon(state: dict) -> float:
    """The recomputation shown in fedtune.common.privacy's module docstring, verbatim."""
    dpa = dp_accounting
    acc = dpa.rdp.RdpAccountant() if state["accountant"] == "rdp" else dpa.pld.PLDAccountant()
    for (sigma, q), rounds in collections.Counter(map(tuple, state["history"])).items():
        g = dpa.GaussianDpEvent(sigma)
        acc.compose(g if q == 1 else dpa.PoissonSampledDpEvent(q, g), rounds)
    return acc.get_epsilon(state["delta"])


# --- compute_epsilon ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("noise_multiplier", "sampling_rate", "rounds", "accountant"),
    [
        # Every σ, q and round count appears with every other value of the other two (rdp).
        (0.5, 0.1, 1, "rdp"),
        (0.5, 0.5, 10, "rdp"),
        (0.5, 1.0, 100, "rdp"),
        (1.0, 0.1, 10, "rdp"),
        (1.0, 0.5, 100, "rdp"),
        (1.0, 1.0, 1, "rdp"),
        (2.0, 0.1, 100, "rdp"),
        (2.0, 0.5, 1, "rdp"),
        (2.0, 1.0, 10, "rdp"),
        # pld is slower: two cheap settings, one sampled and one plain Gaussian.
        (2.0, 0.1, 10, "pld"),
        (2.0, 1.0, 1, "pld"),
    ],
)
def test_compute_epsilon_equals_dp_accounting(
    noise_multiplier: float, sampling_rate: float, rounds: int, accountant: str
) -> None:
    # Prepare
    expected = _direct_epsilon(noise_multiplier, sampling_rate, rounds, accountant)

    # Execute
    epsilon = compute_epsilon(
        noise_multiplier=noise_multiplier,
        sampling_rate=sampling_rate,
        rounds=rounds,
        delta=DELTA,
        accountant=accountant,
    )

    # Assert
    assert type(epsilon) is float
    assert math.isfinite(epsilon) and epsilon > 0
    assert epsilon == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    ("noise_multiplier", "sampling_rate", "rounds", "accountant", "pinned"),
    [
        # Computed once with dp-accounting 0.6.0 and hard-coded: a change in the library shows here.
        (1.0, 0.1, 100, "rdp", 7.90385),
        (2.0, 1.0, 10, "rdp", 8.07941),
        (2.0, 0.1, 10, "pld", 0.798468),
    ],
)
def test_compute_epsilon_pinned_values(
    noise_multiplier: float, sampling_rate: float, rounds: int, accountant: str, pinned: float
) -> None:
    # Execute
    epsilon = compute_epsilon(
        noise_multiplier=noise_multiplier,
        sampling_rate=sampling_rate,
        rounds=rounds,
        delta=DELTA,
        accountant=accountant,
    )

    # Assert
    assert epsilon == pytest.approx(pinned, rel=1e-5)


@pytest.mark.parametrize("accountant", ACCOUNTANTS)
@pytest.mark.parametrize(
    ("noise_multiplier", "rounds", "expected"),
    [
        (1.0, 0, 0.0),
        (0.0, 0, 0.0),
        (0.0, 1, math.inf),
        (0.0, 50, math.inf),
    ],
)
def test_compute_epsilon_edge_cases(
    noise_multiplier: float, rounds: int, expected: float, accountant: str
) -> None:
    # Execute
    epsilon = compute_epsilon(
        noise_multiplier=noise_multiplier,
        sampling_rate=0.5,
        rounds=rounds,
        delta=DELTA,
        accountant=accountant,
    )

    # Assert
    assert epsilon == expected


@pytest.mark.parametrize(
    ("varied", "values", "increasing"),
    [
        ("rounds", [1, 10, 100], True),
        ("sampling_rate", [0.1, 0.5, 1.0], True),
        ("noise_multiplier", [0.5, 1.0, 2.0], False),
    ],
)
def test_compute_epsilon_is_monotone(varied: str, values: list[float], increasing: bool) -> None:
    # Prepare
    base = {"noise_multiplier": 1.0, "sampling_rate": 0.5, "rounds": 10, "delta": DELTA}

    # Execute
    epsilons = [compute_epsilon(**{**base, varied: value}) for value in values]

    # Assert
    ordered = epsilons if increasing else epsilons[::-1]
    assert ordered == sorted(ordered)
    assert len(set(epsilons)) == len(epsilons)


@pytest.mark.parametrize(
    ("noise_multiplier", "sampling_rate", "rounds"),
    [
        (2.0, 0.1, 10),
        (2.0, 1.0, 10),
    ],
)
def test_pld_is_finite_within_factor_two_and_tighter_than_rdp(
    noise_multiplier: float, sampling_rate: float, rounds: int
) -> None:
    # Prepare
    setting = {"noise_multiplier": noise_multiplier, "sampling_rate": sampling_rate, "rounds": rounds}

    # Execute
    rdp = compute_epsilon(**setting, delta=DELTA, accountant="rdp")
    pld = compute_epsilon(**setting, delta=DELTA, accountant="pld")

    # Assert: RDP's conversion to (ε, δ) is an upper bound; PLD is (near) exact, hence smaller here.
    assert math.isfinite(rdp) and math.isfinite(pld)
    assert rdp / 2 <= pld <= rdp


# --- noise_for_epsilon ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target_epsilon", "sampling_rate", "rounds", "accountant"),
    [
        (8.0, 1.0, 10, "rdp"),
        (8.0, 0.1, 10, "rdp"),
        (0.5, 1.0, 1, "rdp"),
    ],
)
def test_noise_for_epsilon_is_the_smallest_noise_reaching_the_target(
    target_epsilon: float, sampling_rate: float, rounds: int, accountant: str
) -> None:
    # Prepare
    setting = {"sampling_rate": sampling_rate, "rounds": rounds, "delta": DELTA, "accountant": accountant}

    # Execute
    noise_multiplier = noise_for_epsilon(target_epsilon=target_epsilon, **setting)

    # Assert
    assert compute_epsilon(noise_multiplier=noise_multiplier, **setting) <= target_epsilon
    assert compute_epsilon(noise_multiplier=noise_multiplier * (1 - 1e-3), **setting) > target_epsilon


def test_noise_for_epsilon_without_rounds_is_zero() -> None:
    # Execute
    noise_multiplier = noise_for_epsilon(target_epsilon=1.0, sampling_rate=0.5, rounds=0, delta=DELTA)

    # Assert
    assert noise_multiplier == 0.0


def test_noise_for_epsilon_out_of_reach_names_the_key() -> None:
    # Execute / Assert: RDP's (ε, δ) conversion cannot go below ~0.0035 here, whatever the noise.
    with pytest.raises(ValueError, match="dp-target-epsilon"):
        noise_for_epsilon(target_epsilon=1e-4, sampling_rate=1.0, rounds=10, delta=DELTA)


# --- PrivacyAccountant ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("noise_multiplier", "sampling_rate", "steps", "accountant"),
    [
        (1.0, 0.1, 0, "rdp"),
        (1.0, 0.1, 1, "rdp"),
        (1.0, 0.1, 10, "rdp"),
        (0.8, 1.0, 25, "rdp"),
        (2.0, 0.1, 3, "pld"),
    ],
)
def test_accountant_after_k_steps_equals_compute_epsilon(
    noise_multiplier: float, sampling_rate: float, steps: int, accountant: str
) -> None:
    # Prepare
    acc = PrivacyAccountant(noise_multiplier=noise_multiplier, delta=DELTA, accountant=accountant)

    # Execute
    for _ in range(steps):
        acc.step(sampling_rate)

    # Assert
    assert acc.rounds == steps
    assert acc.history == [(noise_multiplier, sampling_rate)] * steps
    assert acc.epsilon() == compute_epsilon(
        noise_multiplier=noise_multiplier,
        sampling_rate=sampling_rate,
        rounds=steps,
        delta=DELTA,
        accountant=accountant,
    )


@pytest.mark.parametrize(
    ("noise_multiplier", "sampling_rates", "accountant"),
    [
        (1.0, [0.1, 0.1, 0.5, 1.0, 0.1], "rdp"),
        (2.0, [0.5, 1.0, 0.5], "pld"),
    ],
)
def test_accountant_heterogeneous_rates_equal_direct_composition(
    noise_multiplier: float, sampling_rates: list[float], accountant: str
) -> None:
    # Prepare: one dp-accounting event per round, composed in round order.
    direct = dp_accounting.rdp.RdpAccountant() if accountant == "rdp" else dp_accounting.pld.PLDAccountant()
    for q in sampling_rates:
        gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
        direct.compose(gaussian if q == 1 else dp_accounting.PoissonSampledDpEvent(q, gaussian))
    acc = PrivacyAccountant(noise_multiplier=noise_multiplier, delta=DELTA, accountant=accountant)

    # Execute
    for q in sampling_rates:
        acc.step(q)

    # Assert: equal rounds are grouped, so only the order of a commutative composition differs.
    assert acc.epsilon() == pytest.approx(direct.get_epsilon(DELTA), rel=1e-9)


@pytest.mark.parametrize(
    ("sampling_rates", "accountant"),
    [
        ([], "rdp"),
        ([0.1, 0.1, 0.5, 1.0, 0.1], "rdp"),
        ([1.0, 1.0], "pld"),
    ],
)
def test_state_dict_json_round_trip_and_docstring_recipe(
    sampling_rates: list[float], accountant: str
) -> None:
    # Prepare
    acc = PrivacyAccountant(noise_multiplier=2.0, delta=DELTA, accountant=accountant)
    for q in sampling_rates:
        acc.step(q)

    # Execute
    state = json.loads(json.dumps(acc.state_dict()))
    restored = PrivacyAccountant.from_state_dict(state)

    # Assert
    assert state["library"] == f"dp-accounting {importlib.metadata.version('dp-accounting')}"
    assert "PoissonSampledDpEvent" in state["mechanism"] and "get_epsilon(delta)" in state["mechanism"]
    assert (restored.noise_multiplier, restored.delta, restored.accountant) == (2.0, DELTA, accountant)
    assert restored.history == acc.history
    assert restored.rounds == acc.rounds
    assert restored.epsilon() == acc.epsilon()
    assert _recipe_epsilon(state) == pytest.approx(acc.epsilon(), rel=1e-12)


@pytest.mark.parametrize(
    ("target_from_next", "expected"),
    [
        (lambda current, after_next: after_next * 1.01, False),
        (lambda current, after_next: after_next * 0.99, True),
        (lambda current, after_next: (current + after_next) / 2, True),
        (lambda current, after_next: current * 0.99, True),
    ],
    ids=["above-next", "just-below-next", "between-current-and-next", "already-exceeded"],
)
def test_would_exceed(target_from_next: Callable[[float, float], float], expected: bool) -> None:
    # Prepare
    acc = PrivacyAccountant(noise_multiplier=1.0, delta=DELTA)
    for _ in range(10):
        acc.step(0.1)
    current = acc.epsilon()
    after_next = compute_epsilon(noise_multiplier=1.0, sampling_rate=0.1, rounds=11, delta=DELTA)

    # Execute
    exceeds = acc.would_exceed(target_from_next(current, after_next), 0.1)

    # Assert: the answer, and the accountant itself is left untouched.
    assert exceeds is expected
    assert acc.rounds == 10
    assert acc.epsilon() == current


def test_dp_accounting_warnings_are_silenced_and_logging_restored(caplog: pytest.LogCaptureFixture) -> None:
    # Prepare: σ = 0.5, q = 0.1 makes dp-accounting warn about unconverged fractional orders.
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level

    # Execute
    with caplog.at_level(logging.WARNING):
        compute_epsilon(noise_multiplier=0.5, sampling_rate=0.1, rounds=1, delta=DELTA)

    # Assert
    assert not [record for record in caplog.records if record.name == "absl"]
    assert absl_logger.level == level


# --- input errors ---------------------------------------------------------------------------------


def _valid_state() -> dict:
    return PrivacyAccountant(noise_multiplier=1.0, delta=DELTA).state_dict()


def _stepped(sampling_rate: float) -> None:
    PrivacyAccountant(noise_multiplier=1.0, delta=DELTA).step(sampling_rate)


_SETTING = {"sampling_rate": 0.5, "rounds": 10, "delta": DELTA}


@pytest.mark.parametrize(
    ("call", "key"),
    [
        pytest.param(
            lambda: compute_epsilon(**_SETTING, noise_multiplier=-1.0), "dp-noise-multiplier", id="sigma<0"
        ),
        pytest.param(
            lambda: compute_epsilon(**_SETTING, noise_multiplier=math.nan),
            "dp-noise-multiplier",
            id="sigma-nan",
        ),
        pytest.param(
            lambda: compute_epsilon(noise_multiplier=1.0, sampling_rate=0.5, rounds=10, delta=0.0),
            "dp-delta",
            id="delta=0",
        ),
        pytest.param(
            lambda: compute_epsilon(noise_multiplier=1.0, sampling_rate=0.5, rounds=10, delta=1.0),
            "dp-delta",
            id="delta=1",
        ),
        pytest.param(
            lambda: compute_epsilon(noise_multiplier=1.0, sampling_rate=0.0, rounds=10, delta=DELTA),
            "fraction-train",
            id="q=0",
        ),
        pytest.param(
            lambda: compute_epsilon(noise_multiplier=1.0, sampling_rate=1.5, rounds=10, delta=DELTA),
            "fraction-train",
            id="q>1",
        ),
        pytest.param(
            lambda: compute_epsilon(noise_multiplier=1.0, sampling_rate=0.5, rounds=-1, delta=DELTA),
            "num-server-rounds",
            id="rounds<0",
        ),
        pytest.param(
            lambda: compute_epsilon(noise_multiplier=1.0, sampling_rate=0.5, rounds=2.5, delta=DELTA),
            "num-server-rounds",
            id="rounds-not-int",
        ),
        pytest.param(
            lambda: compute_epsilon(**_SETTING, noise_multiplier=1.0, accountant="gdp"),
            "valid accountants: rdp, pld",
            id="accountant",
        ),
        pytest.param(
            lambda: noise_for_epsilon(**_SETTING, target_epsilon=0.0), "dp-target-epsilon", id="target=0"
        ),
        pytest.param(
            lambda: noise_for_epsilon(**_SETTING, target_epsilon=math.inf),
            "dp-target-epsilon",
            id="target-inf",
        ),
        pytest.param(
            lambda: noise_for_epsilon(**_SETTING, target_epsilon=8.0, accountant="moments"),
            "valid accountants: rdp, pld",
            id="noise-accountant",
        ),
        pytest.param(
            lambda: PrivacyAccountant(noise_multiplier=-0.1, delta=DELTA),
            "dp-noise-multiplier",
            id="accountant-sigma",
        ),
        pytest.param(
            lambda: PrivacyAccountant(noise_multiplier=1.0, delta=2.0), "dp-delta", id="accountant-delta"
        ),
        pytest.param(lambda: _stepped(0.0), "fraction-train", id="step-q=0"),
        pytest.param(
            lambda: PrivacyAccountant(noise_multiplier=1.0, delta=DELTA).would_exceed(-1.0, 0.5),
            "dp-target-epsilon",
            id="would-exceed-target",
        ),
        pytest.param(
            lambda: PrivacyAccountant.from_state_dict(
                {k: v for k, v in _valid_state().items() if k != "history"}
            ),
            "history",
            id="state-missing-key",
        ),
        pytest.param(
            lambda: PrivacyAccountant.from_state_dict({**_valid_state(), "history": [[1.0, 2.0]]}),
            "fraction-train",
            id="state-bad-rate",
        ),
        pytest.param(
            lambda: PrivacyAccountant.from_state_dict({**_valid_state(), "delta": 0.0}),
            "dp-delta",
            id="state-bad-delta",
        ),
    ],
)
def test_invalid_inputs_raise_value_error_naming_the_key(call: Callable[[], object], key: str) -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match=key):
        call()
