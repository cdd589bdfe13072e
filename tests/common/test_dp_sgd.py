"""Patient-level DP-SGD: Opacus' clipping and noise against an explicit loop, per-site accounting, budget."""

from __future__ import annotations

import dp_accounting
import numpy as np
import pytest
import torch
from fedtune.common.config import ConfigError, FedConfig
from fedtune.common.dp_sgd import (
    ExampleDP,
    empty_step,
    example_dp,
    poisson_batches,
    private,
    release,
    site_metrics,
)
from fedtune.common.local_plan import steps_per_round
from fedtune.common.site_errors import PrivacyBudgetExhaustedError, category_of


def _mechanism(**overrides: float) -> ExampleDP:
    values = {
        "noise_multiplier": 1.0,
        "clipping_norm": 0.5,
        "sampling_rate": 0.25,
        "expected_batch": 4,
        "round_steps": 10,
        "delta": 1e-5,
        "accountant": "rdp",
        "target_epsilon": 0.0,
        **overrides,
    }
    return ExampleDP(**values)


def _tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(5, 3)


def test_one_step_clips_each_examples_gradient_and_averages_over_the_expected_batch() -> None:
    # Prepare: examples whose gradients are above the clipping norm and others below it, no noise,
    # SGD with lr 1
    model, dp = _tiny(), _mechanism(noise_multiplier=0.0, clipping_norm=3.0, expected_batch=4)
    x = torch.randn(6, 5) * torch.tensor([8.0, 8.0, 8.0, 0.01, 0.01, 0.01])[:, None]
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    before = [p.detach().clone() for p in model.parameters()]
    expected = [torch.zeros_like(p) for p in model.parameters()]
    clipped: list[bool] = []
    for i in range(6):  # the explicit loop: each example's gradient, clipped to norm C over all tensors
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        grads = [p.grad.detach().clone() for p in model.parameters()]
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        clipped.append(norm.item() > 3.0)
        for e, g in zip(expected, grads, strict=True):
            e += g * min(1.0, 3.0 / (norm.item() + 1e-6))
    model.zero_grad()
    net, optimizer = private(model, torch.optim.SGD(model.parameters(), lr=1.0), dp)

    # Execute
    torch.nn.functional.cross_entropy(net(x), y).backward()
    optimizer.step()
    release(net)

    # Assert: the step is minus the sum of clipped gradients over the expected batch size (4, not 6)
    assert any(clipped) and not all(clipped)
    for b, p, e in zip(before, model.parameters(), expected, strict=True):
        torch.testing.assert_close(b - p.detach(), e / 4, atol=1e-5, rtol=1e-4)
    assert not any(hasattr(p, "grad_sample") and p.grad_sample is not None for p in model.parameters())


def test_the_noise_has_std_sigma_times_the_clipping_norm_over_the_expected_batch() -> None:
    # Prepare: an empty Poisson sample (noise only) on 40,000 parameters
    model = torch.nn.Linear(200, 200, bias=False)
    dp = _mechanism(noise_multiplier=2.0, clipping_norm=0.5, expected_batch=4)
    before = model.weight.detach().clone()
    net, optimizer = private(model, torch.optim.SGD(model.parameters(), lr=1.0), dp)

    # Execute
    empty_step(optimizer)
    release(net)

    # Assert: std = 2 x 0.5 / 4 = 0.25 (40,000 draws: within 2%), mean 0
    step = (before - model.weight.detach()).numpy()
    assert step.std() == pytest.approx(0.25, rel=0.02)
    assert abs(step.mean()) < 0.01


def test_two_runs_draw_different_noise_whatever_the_seed() -> None:
    # Prepare / Execute: the same seed twice; the noise comes from OS entropy
    steps = []
    for _ in range(2):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 4)
        before = model.weight.detach().clone()
        net, optimizer = private(model, torch.optim.SGD(model.parameters(), lr=1.0), _mechanism())
        empty_step(optimizer)
        release(net)
        steps.append(before - model.weight.detach())

    # Assert
    assert not torch.equal(steps[0], steps[1])


def test_poisson_samples_hold_each_example_with_probability_q_from_fresh_entropy() -> None:
    # Execute
    dp = _mechanism(sampling_rate=0.1)
    epoch = next(poisson_batches(1000, dp))
    sizes = [len(idx) for idx in epoch]
    other = next(next(poisson_batches(1000, dp)))

    # Assert: ceil(1 / q) samples per epoch, of mean size q x n, sorted unique indices
    assert len(sizes) == 10
    assert np.mean(sizes) == pytest.approx(100, abs=15)
    first = next(next(poisson_batches(1000, dp)))
    assert np.all(np.diff(first) > 0) and not np.array_equal(first, other)


def test_site_epsilon_is_dp_accountings_poisson_sampled_gaussian_over_every_step_so_far() -> None:
    # Prepare
    dp = _mechanism(noise_multiplier=1.1, sampling_rate=0.02, round_steps=30)
    direct = dp_accounting.rdp.RdpAccountant()
    event = dp_accounting.PoissonSampledDpEvent(0.02, dp_accounting.GaussianDpEvent(1.1))
    direct.compose(dp_accounting.SelfComposedDpEvent(event, 3 * 30))

    # Execute
    epsilon = dp.epsilon_after(3)

    # Assert: the same figure; Opacus' own RDP accountant agrees within its coarser grid of orders
    from opacus.accountants import RDPAccountant

    opacus_accountant = RDPAccountant()
    opacus_accountant.history = [(1.1, 0.02, 90)]
    assert epsilon == pytest.approx(direct.get_epsilon(1e-5), rel=1e-9)
    assert opacus_accountant.get_epsilon(1e-5) == pytest.approx(epsilon, rel=0.05)
    assert dp.epsilon_after(0) == 0.0 and dp.epsilon_after(4) > epsilon


def test_calibration_ends_each_site_at_or_under_its_budget_after_the_last_round() -> None:
    # Prepare
    cfg = FedConfig(dp_mode="example", dp_example_target_epsilon=4.0, num_server_rounds=5, local_steps=20)

    # Execute
    dp = example_dp(cfg, examples=400)

    # Assert: q = 32 / 400; the budget met at round 5 and missed with a slightly smaller sigma
    assert dp.sampling_rate == pytest.approx(32 / 400) and dp.round_steps == steps_per_round(400, cfg) == 20
    assert dp.epsilon_after(5) <= 4.0
    smaller = ExampleDP(**{**dp.__dict__, "noise_multiplier": 0.99 * dp.noise_multiplier})
    assert smaller.epsilon_after(5) > 4.0
    assert dp.check_budget(5) == pytest.approx(dp.epsilon_after(5))


def test_a_site_whose_next_round_would_pass_its_budget_stops_and_says_so() -> None:
    # Prepare: a fixed sigma whose epsilon passes the budget between rounds 2 and 3
    dp = _mechanism(noise_multiplier=1.0, sampling_rate=0.1, round_steps=20)
    budget = (dp.epsilon_after(2) + dp.epsilon_after(3)) / 2
    capped = ExampleDP(**{**dp.__dict__, "target_epsilon": budget})

    # Execute / Assert
    assert capped.check_budget(2) < budget
    with pytest.raises(
        PrivacyBudgetExhaustedError, match="Round 3 .* past `dp-example-target-epsilon`"
    ) as info:
        capped.check_budget(3)
    assert category_of(info.value) == "privacy-budget"
    assert dp.check_budget(50) > budget  # no budget: never stops


def test_the_site_metrics_carry_its_epsilon_sigma_steps_and_sampling_rate() -> None:
    # Execute
    metrics = site_metrics(_mechanism(round_steps=10), server_round=3, epsilon=1.5)

    # Assert
    assert metrics == {
        "dp_example_epsilon": 1.5,
        "dp_example_sigma": 1.0,
        "dp_example_steps": 30.0,
        "dp_example_sampling_rate": 0.25,
    }


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"dp_example_target_epsilon": 0.0},
            "both `dp-example-noise-multiplier` and `dp-example-target-epsilon`",
        ),
        ({"dp_example_target_epsilon": 1e-6, "num_server_rounds": 50}, "cannot be met over 50 rounds"),
    ],
)
def test_a_mechanism_without_noise_or_reachable_budget_is_refused_naming_the_keys(
    overrides: dict, message: str
) -> None:
    # Execute / Assert
    with pytest.raises(ConfigError, match=message):
        example_dp(FedConfig(dp_mode="example", **overrides), examples=100)


def test_dp_mode_combines_patient_and_client_level_and_refuses_fedprox() -> None:
    # Execute / Assert
    modes = {m: (FedConfig(dp_mode=m).example_dp, FedConfig(dp_mode=m).client_dp) for m in (
        "off", "central", "distributed", "example", "example+central", "example+distributed")}  # fmt: skip
    assert modes == {
        "off": (False, "off"),
        "central": (False, "central"),
        "distributed": (False, "distributed"),
        "example": (True, "off"),
        "example+central": (True, "central"),
        "example+distributed": (True, "distributed"),
    }
    with pytest.raises(ConfigError, match="`strategy=fedprox`"):
        FedConfig(dp_mode="example", strategy="fedprox")
