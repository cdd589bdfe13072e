"""Tests of fedtune.common.local_plan: steps per round, the run-wide schedule, label-skew corrections."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from fedtune.common.config import FedConfig
from fedtune.common.local_plan import (
    SCHEDULES,
    SKEW_CORRECTIONS,
    Schedule,
    label_counts,
    logit_adjustment,
    restricted_softmax,
    skew_transform,
    steps_per_round,
)

# ---- steps per round --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("examples", "local_epochs", "local_steps", "batch", "expected"),
    [
        (100, 1, 30, 32, 4),  # ceil(100 / 32): local-epochs > 0 wins over local-steps
        (96, 1, 30, 32, 3),
        (100, 3, 30, 32, 12),
        (100, 0, 7, 32, 7),  # local-epochs 0: local-steps
        (5, 0, 40, 32, 40),  # more steps than one epoch of batches
        (100, 0, 1, 32, 1),
        (100, 2, 0, 32, 8),
    ],
)
def test_steps_per_round(
    examples: int, local_epochs: int, local_steps: int, batch: int, expected: int
) -> None:
    cfg = FedConfig(local_epochs=local_epochs, local_steps=local_steps, batch_size=batch)
    assert steps_per_round(examples, cfg) == expected


# ---- schedule -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (0, 0.25),  # warm-up: (step + 1) / warmup
        (1, 0.5),
        (3, 1.0),  # the last warm-up step reaches the peak
        (4, 1.0),  # cosine starts at its top
        (8, 0.5 * (1 + math.cos(math.pi * 4 / 8))),  # half way through the decay: 0.5
        (10, 0.5 * (1 + math.cos(math.pi * 6 / 8))),
        (12, 0.0),  # the end of the run
        (20, 0.0),  # past the end (a resumed run): stays at the end
    ],
)
def test_cosine_schedule_values(step: int, expected: float) -> None:
    schedule = Schedule("cosine", total=12, warmup=4)
    assert schedule.factor(step) == pytest.approx(expected, abs=1e-12)


def test_cosine_without_warm_up_starts_at_the_peak_and_decreases() -> None:
    schedule = Schedule("cosine", total=10)
    values = [schedule.factor(s) for s in range(10)]
    assert values[0] == 1.0
    assert all(a > b for a, b in zip(values, values[1:], strict=False))
    assert values[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 9 / 10)))


def test_short_schedules_end_at_zero_and_may_be_all_warm_up() -> None:
    assert Schedule("cosine", total=3, warmup=2).factor(3) == 0.0  # one decay step
    all_warm_up = Schedule("cosine", total=4, warmup=4)
    assert [all_warm_up.factor(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]


def test_constant_schedule_is_one_everywhere() -> None:
    schedule = Schedule("constant", total=5, warmup=2)
    assert [schedule.factor(s) for s in range(8)] == [1.0] * 8


def test_round_schedule_continues_where_the_previous_round_stopped() -> None:
    # Prepare: 3 rounds of 4 steps, 25% warm-up = 3 steps of the run's 12
    cfg = FedConfig(num_server_rounds=3, lr_schedule="cosine", lr_warmup=0.25)
    whole = Schedule("cosine", total=12, warmup=3)

    # Execute
    per_round = [Schedule.for_round(cfg, r, 4) for r in (1, 2, 3)]

    # Assert: round r's step s is the run's step 4 (r - 1) + s
    assert [s.offset for s in per_round] == [0, 4, 8]
    assert all(s.total == 12 and s.warmup == 3 for s in per_round)
    got = [s.factor(step) for s in per_round for step in range(4)]
    assert got == [whole.factor(step) for step in range(12)]


def test_unknown_schedule_lists_the_supported_ones() -> None:
    with pytest.raises(
        ValueError, match="`lr-schedule` 'linear' is not supported; supported: constant, cosine"
    ):
        Schedule("linear", total=3)
    assert set(SCHEDULES) == {"constant", "cosine"}


# ---- label-skew corrections ---------------------------------------------------------------------------


def test_label_counts_include_absent_labels() -> None:
    assert label_counts(np.array([0, 2, 2, 2]), 4).tolist() == [1, 0, 3, 0]


def test_logit_adjustment_adds_tau_times_the_log_prior() -> None:
    # Prepare: 10 examples over 3 labels, label 2 absent; prior = (count + 1) / (n + K)
    counts = np.array([7, 3, 0])
    prior = np.array([8, 4, 1]) / 13
    logits = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0]])

    # Execute
    adjusted = logit_adjustment(counts, tau=0.5)(logits)

    # Assert
    expected = logits + 0.5 * torch.tensor(np.log(prior), dtype=torch.float32)
    torch.testing.assert_close(adjusted, expected)
    assert torch.isfinite(adjusted).all()  # the absent label's log prior is finite


def test_logit_adjustment_lowers_the_loss_of_a_frequent_label_and_tau_zero_is_plain() -> None:
    counts = np.array([90, 10])
    logits = torch.zeros(1, 2)
    plain = torch.nn.functional.cross_entropy(logits, torch.tensor([0]))
    adjusted = torch.nn.functional.cross_entropy(logit_adjustment(counts, 1.0)(logits), torch.tensor([0]))
    assert adjusted < plain
    torch.testing.assert_close(logit_adjustment(counts, 0.0)(logits), logits)


def test_restricted_softmax_scales_only_the_absent_labels() -> None:
    counts = np.array([4, 0, 1, 0])
    logits = torch.tensor([[2.0, 3.0, -1.0, -4.0]])
    scaled = restricted_softmax(counts, alpha=0.25)(logits)
    torch.testing.assert_close(scaled, torch.tensor([[2.0, 0.75, -1.0, -1.0]]))


@pytest.mark.parametrize("name", ["none", "logit-adjust", "restricted-softmax"])
def test_skew_transform_uses_the_sites_own_labels(name: str) -> None:
    # Prepare
    cfg = FedConfig(label_skew=name, logit_adjust_tau=2.0, restricted_softmax_alpha=0.1)
    labels = np.array([0, 0, 0, 1])
    logits = torch.ones(2, 3)

    # Execute
    transform = skew_transform(cfg, labels, num_labels=3)

    # Assert
    if name == "none":
        assert transform is None
        return
    reference = SKEW_CORRECTIONS[name](np.array([3, 1, 0]), cfg)
    torch.testing.assert_close(transform(logits), reference(logits))
    assert not torch.equal(transform(logits), logits)


def test_unknown_skew_correction_lists_the_supported_ones() -> None:
    cfg = FedConfig(label_skew="fedlc")  # type: ignore[arg-type] - direct construction skips the parser
    with pytest.raises(ValueError, match="none, logit-adjust, restricted-softmax"):
        skew_transform(cfg, np.array([0]), 2)
