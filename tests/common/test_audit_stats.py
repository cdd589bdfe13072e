"""Tests for the canary-audit statistics in :mod:`fedtune.common.audit_stats`."""

from __future__ import annotations

import numpy as np
import pytest
from fedtune.common.audit_stats import OneRunAudit, attack_auc, one_run_epsilon, tpr_at_fpr
from scipy.special import expit, logit

_SEEDS = range(20)


def _canaries(m: int, seed: int) -> np.ndarray:
    """Inclusion truth of ``m`` canaries, each included with probability 1/2."""
    return np.random.default_rng(seed).random(m) < 0.5


def _randomized_response(epsilon: float, m: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores from an ε-DP run: each canary's inclusion bit is reported truthfully w.p. e^ε / (1 + e^ε).

    A small uniform jitter (independent of inclusion, so post-processing) breaks ties between scores.
    """
    rng = np.random.default_rng(seed)
    members = rng.random(m) < 0.5
    truthful = rng.random(m) < expit(epsilon)
    reported = np.where(truthful, members, ~members)
    return reported + 0.5 * rng.random(m), members


# ---------------------------------------------------------------------------------------------------
# attack_auc / tpr_at_fpr
# ---------------------------------------------------------------------------------------------------

_MEMBERS = np.array([True, False, True, True, False, False])
_SCORES = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.1])  # ROC: (0, 1/3), (1/3, 1/3), (1/3, 1), (1, 1)


def test_attack_auc_perfect_inverted_and_tied() -> None:
    members = np.array([False, False, True, True])
    assert attack_auc(np.array([0.1, 0.2, 0.8, 0.9]), members) == 1.0
    assert attack_auc(np.array([0.9, 0.8, 0.2, 0.1]), members) == 0.0
    assert attack_auc(np.zeros(4), members) == 0.5


def test_attack_auc_hand_computed_and_integer_members() -> None:
    # 9 member/non-member pairs, 7 ordered correctly (0.7 and 0.6 fall below the non-member 0.8).
    assert attack_auc(_SCORES, _MEMBERS) == pytest.approx(7 / 9)
    assert attack_auc(_SCORES, _MEMBERS.astype(int)) == pytest.approx(7 / 9)


def test_attack_auc_random_scores_near_half() -> None:
    rng = np.random.default_rng(0)
    assert attack_auc(rng.random(20_000), _canaries(20_000, 1)) == pytest.approx(0.5, abs=0.02)


def test_tpr_at_fpr_step_function_without_interpolation() -> None:
    assert tpr_at_fpr(_SCORES, _MEMBERS, fpr=0.0) == pytest.approx(1 / 3)
    # Linear interpolation between (0, 1/3) and (1/3, 1) would give 0.93 at FPR 0.3.
    assert tpr_at_fpr(_SCORES, _MEMBERS, fpr=0.3) == pytest.approx(1 / 3)
    assert tpr_at_fpr(_SCORES, _MEMBERS, fpr=1 / 3) == 1.0
    assert tpr_at_fpr(_SCORES, _MEMBERS, fpr=1.0) == 1.0


def test_tpr_at_fpr_perfect_inverted_and_random() -> None:
    members = _canaries(1000, 2)
    assert tpr_at_fpr(members.astype(float), members, fpr=0.0) == 1.0
    assert tpr_at_fpr(-members.astype(float), members, fpr=0.01) == 0.0
    rng = np.random.default_rng(3)
    assert tpr_at_fpr(rng.random(20_000), _canaries(20_000, 4), fpr=0.1) == pytest.approx(0.1, abs=0.02)


@pytest.mark.parametrize("statistic", [attack_auc, tpr_at_fpr])
@pytest.mark.parametrize(
    ("scores", "members", "match"),
    [
        (np.array([0.1, 0.2]), np.array([True, True]), "one class"),
        (np.array([0.1, 0.2]), np.array([False, False]), "one class"),
        (np.array([0.1, 0.2, 0.3]), np.array([True, False]), "entries"),
        (np.zeros((2, 2)), np.array([True, False]), "1-D"),
        (np.array([np.nan, 0.2]), np.array([True, False]), "finite"),
        (np.array([0.1, 0.2]), np.array([2, 0]), "booleans"),
        (np.array([]), np.array([], dtype=bool), "empty"),
    ],
)
def test_roc_statistics_reject_bad_inputs(statistic, scores, members, match) -> None:
    with pytest.raises(ValueError, match=match):
        statistic(scores, members)


@pytest.mark.parametrize("fpr", [-0.1, 1.5])
def test_tpr_at_fpr_rejects_fpr_out_of_range(fpr: float) -> None:
    with pytest.raises(ValueError, match="fpr"):
        tpr_at_fpr(_SCORES, _MEMBERS, fpr=fpr)


# ---------------------------------------------------------------------------------------------------
# one_run_epsilon
# ---------------------------------------------------------------------------------------------------


def test_one_run_epsilon_no_signal_gives_no_bound() -> None:
    bounds = []
    for seed in range(5):
        scores = np.random.default_rng(100 + seed).random(1000)
        bounds.append(one_run_epsilon(scores, _canaries(1000, seed), delta=1e-5).epsilon_lower_bound)
    assert max(bounds) < 0.2
    assert bounds.count(0.0) >= 4


def test_one_run_epsilon_perfect_separation_grows_with_canaries() -> None:
    small, large = (_canaries(m, seed=5) for m in (100, 1000))
    bound_small = one_run_epsilon(small.astype(float), small, delta=1e-5)
    bound_large = one_run_epsilon(large.astype(float), large, delta=1e-5)
    assert 2.0 < bound_small.epsilon_lower_bound < bound_large.epsilon_lower_bound
    assert bound_large.epsilon_lower_bound > 4.0
    assert bound_large.correct == bound_large.guesses  # the winning guesses are all right


def test_one_run_epsilon_matches_closed_form() -> None:
    # 100 members above 100 non-members; guessing r = 100 gets all right with either grid point,
    # so the bound solves P[Binomial(100, q) >= 100] = q^100 = 0.05 / 2 for ε = logit(q).
    members = np.arange(200) % 2 == 0
    audit = one_run_epsilon(members.astype(float), members, delta=0.0, guess_counts=[100])
    assert audit == OneRunAudit(
        epsilon_lower_bound=pytest.approx(logit(0.025 ** (1 / 100)), abs=1e-5),
        confidence=0.95,
        delta=0.0,
        guesses=100,
        correct=100,
        canaries=200,
        k_plus=50,
        k_minus=50,
        grid_size=2,
    )


def test_one_run_epsilon_delta_and_confidence_only_lower_the_bound() -> None:
    scores, members = _randomized_response(2.0, 2000, seed=0)
    base = one_run_epsilon(scores, members, delta=0.0).epsilon_lower_bound
    assert one_run_epsilon(scores, members, delta=1e-5).epsilon_lower_bound <= base
    assert one_run_epsilon(scores, members, delta=1 / 4000).epsilon_lower_bound < base
    assert one_run_epsilon(scores, members, delta=0.0, confidence=0.99).epsilon_lower_bound < base


def test_one_run_epsilon_default_grid_is_deduplicated() -> None:
    members = _canaries(10, seed=6)
    # m = 10: counts {1, 2, 5, 10} -> (1, 0), (1, 1), (2, 0), (3, 2), (5, 0), (5, 5), (10, 0).
    assert one_run_epsilon(np.zeros(10), members, delta=0.0).grid_size == 7


@pytest.mark.parametrize("epsilon", [1.0, 2.0])
def test_one_run_epsilon_is_valid_for_randomized_response(epsilon: float) -> None:
    bounds = np.array(
        [
            one_run_epsilon(*_randomized_response(epsilon, 2000, seed), delta=1e-5).epsilon_lower_bound
            for seed in _SEEDS
        ]
    )
    assert (bounds > epsilon).sum() <= 2
    assert (bounds > 0.5 * epsilon).sum() >= 18  # and it is not vacuous


def test_one_run_epsilon_single_class_is_allowed() -> None:
    members = np.ones(50, dtype=bool)
    audit = one_run_epsilon(np.arange(50.0), members, delta=0.0, guess_counts=[50])
    assert audit.k_minus == 0 and audit.correct == 50
    assert audit.epsilon_lower_bound == pytest.approx(logit(0.025 ** (1 / 50)), abs=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"delta": -1e-6}, "delta"),
        ({"delta": 0.01}, "delta"),  # > 1 / (2 m) for m = 100
        ({"delta": 0.0, "confidence": 1.0}, "confidence"),
        ({"delta": 0.0, "confidence": 0.0}, "confidence"),
        ({"delta": 0.0, "guess_counts": []}, "empty"),
        ({"delta": 0.0, "guess_counts": [0]}, "guess count"),
        ({"delta": 0.0, "guess_counts": [101]}, "guess count"),
        ({"delta": 0.0, "guess_counts": [2.5]}, "guess count"),
    ],
)
def test_one_run_epsilon_rejects_bad_parameters(kwargs: dict, match: str) -> None:
    members = _canaries(100, seed=7)
    with pytest.raises(ValueError, match=match):
        one_run_epsilon(members.astype(float), members, **kwargs)


def test_one_run_epsilon_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match="entries"):
        one_run_epsilon(np.zeros(3), np.array([True, False]), delta=0.0)


def test_one_run_epsilon_bound_is_bounded_by_guess_count() -> None:
    # Even all r guesses right cannot certify more than logit((1 - confidence)^(1 / r)) per grid point.
    members = _canaries(1000, seed=8)
    audit = one_run_epsilon(members.astype(float), members, delta=0.0)
    assert audit.epsilon_lower_bound <= logit(0.05 ** (1 / audit.guesses)) + 1e-6
