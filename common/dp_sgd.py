"""Patient-level differential privacy at a site: DP-SGD with Opacus, and its per-site accounting.

Under ``dp-mode=example`` (alone or with client-level DP, ``example+central`` /
``example+distributed``) each site trains its trainable parameters (adapter + head) with DP-SGD:
every step draws a Poisson sample of its training examples (each one with probability
``q = batch-size / examples``), Opacus computes each example's gradient
(:class:`opacus.GradSampleModule`), clips it to ``dp-example-clipping-norm`` and adds Gaussian noise
of std ``sigma x clipping norm`` to their sum (:class:`opacus.optimizers.DPOptimizer`). The privacy
unit is one training record (one patient's note).

Accounting: the site's epsilon at ``dp-delta`` after round ``r`` is that of ``r x steps-per-round``
steps of the Poisson-subsampled Gaussian mechanism (``dp-accountant``, dp-accounting). A site is
charged every round up to ``r`` whether or not it was sampled, so the figure never under-counts and
needs no state that a restart could lose. ``dp-example-target-epsilon`` calibrates sigma before the
first round so the site ends at or under it after ``num-server-rounds``; a site whose next round
would exceed it refuses to train (:class:`PrivacyBudgetExhaustedError`).

Secrecy: the Poisson sample and the noise are drawn from fresh OS entropy, never from the run
config's ``seed`` (the coordinator knows it; amplification by sampling needs the sample secret), so
a DP-SGD run is not reproducible from its seed.
"""

from __future__ import annotations

import functools
import math
import secrets
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from .config import ConfigError, FedConfig
from .local_plan import steps_per_round
from .privacy import compute_epsilon, noise_for_epsilon
from .site_errors import PrivacyBudgetExhaustedError

if TYPE_CHECKING:  # Opacus is imported where a site trains with DP-SGD, not by the coordinator
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer


@dataclass(frozen=True)
class ExampleDP:
    """A site's DP-SGD mechanism and its accounting.

    Attributes
    ----------
    noise_multiplier
        sigma: the noise std over the clipping norm.
    clipping_norm
        L2 bound on each example's gradient.
    sampling_rate
        q: each example's probability of being in a step's Poisson sample (``batch-size / examples``).
    expected_batch
        ``batch-size``: the mean sample size, which the noisy gradient sum is divided by.
    round_steps
        DP-SGD steps per round (:func:`~fedtune.common.local_plan.steps_per_round`).
    delta, accountant, target_epsilon
        ``dp-delta``, ``dp-accountant`` and ``dp-example-target-epsilon`` (0 = no budget).
    """

    noise_multiplier: float
    clipping_norm: float
    sampling_rate: float
    expected_batch: int
    round_steps: int
    delta: float
    accountant: str
    target_epsilon: float = 0.0

    def epsilon_after(self, server_round: int) -> float:
        """The site's epsilon after ``server_round`` rounds of DP-SGD (charged every round)."""
        return compute_epsilon(
            noise_multiplier=self.noise_multiplier,
            sampling_rate=self.sampling_rate,
            rounds=server_round * self.round_steps,
            delta=self.delta,
            accountant=self.accountant,
        )

    def check_budget(self, server_round: int) -> float:
        """The site's epsilon after ``server_round``; refuses a round that would pass the target.

        Raises
        ------
        PrivacyBudgetExhaustedError
            When ``target_epsilon`` > 0 and the epsilon after this round exceeds it.
        """
        epsilon = self.epsilon_after(server_round)
        if self.target_epsilon and epsilon > self.target_epsilon:
            raise PrivacyBudgetExhaustedError(
                f"Round {server_round} would take this site's patient-level epsilon to {epsilon:.3f}, past "
                f"`dp-example-target-epsilon`={self.target_epsilon:g} (sigma {self.noise_multiplier:.4g}, "
                f"{self.round_steps} steps per round at q={self.sampling_rate:.4g}); it stops training. "
                "Run fewer rounds, or raise the budget or the noise."
            )
        return epsilon


SITE_LABEL = "site"  # the site's label (partition in simulation, node id in deployment) in its fit metrics
SITE_KEYS = ("dp_example_epsilon", "dp_example_sigma", "dp_example_steps", "dp_example_sampling_rate")


def site_metrics(dp: ExampleDP, server_round: int, epsilon: float) -> dict[str, float]:
    """A site's fit metrics for the coordinator's per-site record (:data:`SITE_KEYS`)."""
    values = (epsilon, dp.noise_multiplier, server_round * dp.round_steps, dp.sampling_rate)
    return dict(zip(SITE_KEYS, map(float, values), strict=True))


@functools.lru_cache(maxsize=32)  # a site asks every round; sigma's calibration is a bisection
def example_dp(cfg: FedConfig, examples: int) -> ExampleDP:
    """The DP-SGD mechanism of a site with ``examples`` training examples under ``cfg``.

    sigma is ``dp-example-noise-multiplier`` when positive, else calibrated so that
    ``num-server-rounds`` rounds end at or under ``dp-example-target-epsilon``. Computed once per
    ``(cfg, examples)`` in a process (a site asks again every round).

    Raises
    ------
    ConfigError
        When neither sigma nor a budget is set, or the budget is out of reach (names the keys).
    """
    q = min(1.0, cfg.batch_size / examples)
    round_steps = steps_per_round(examples, cfg)
    sigma = cfg.dp_example_noise_multiplier
    if sigma == 0.0:
        if cfg.dp_example_target_epsilon == 0.0:
            raise ConfigError(
                "`dp-mode` includes `example` but both `dp-example-noise-multiplier` and "
                "`dp-example-target-epsilon` are 0: set the budget (e.g. 8) or the noise (e.g. 1.0)."
            )
        try:
            sigma = noise_for_epsilon(
                target_epsilon=cfg.dp_example_target_epsilon,
                sampling_rate=q,
                rounds=cfg.num_server_rounds * round_steps,
                delta=cfg.dp_delta,
                accountant=cfg.dp_accountant,
            )
        except ValueError as err:
            raise ConfigError(
                f"`dp-example-target-epsilon`={cfg.dp_example_target_epsilon:g} cannot be met over "
                f"{cfg.num_server_rounds} rounds x {round_steps} DP-SGD steps at q={q:.4g} ({err}); raise "
                "the budget or `dp-delta`, or lower `num-server-rounds` or `local-steps`."
            ) from None
    return ExampleDP(
        noise_multiplier=sigma,
        clipping_norm=cfg.dp_example_clipping_norm,
        sampling_rate=q,
        expected_batch=cfg.batch_size,
        round_steps=round_steps,
        delta=cfg.dp_delta,
        accountant=cfg.dp_accountant,
        target_epsilon=cfg.dp_example_target_epsilon,
    )


def poisson_batches(examples: int, dp: ExampleDP) -> Iterator[Iterator[np.ndarray]]:
    """Endless "epochs" of ``ceil(1 / q)`` Poisson samples each, from fresh OS entropy.

    Each sample holds every example independently with probability ``q``; it may be empty.
    """
    rng = np.random.default_rng(secrets.randbits(128))
    per_epoch = math.ceil(1 / dp.sampling_rate)

    def epoch() -> Iterator[np.ndarray]:
        for _ in range(per_epoch):
            yield np.flatnonzero(rng.random(examples) < dp.sampling_rate)

    while True:
        yield epoch()


def private(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, dp: ExampleDP
) -> tuple[GradSampleModule, DPOptimizer]:
    """``model`` with per-example gradients and ``optimizer`` clipping and noising them (Opacus).

    Close the returned module with :func:`release` when training ends.
    """
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    # Opacus' backward hooks on a frozen-input model: torch warns once per module, harmlessly
    warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
    module = GradSampleModule(model, loss_reduction="mean")
    noise = torch.Generator().manual_seed(secrets.randbits(63))  # never the run's seed
    dp_optimizer = DPOptimizer(
        optimizer,
        noise_multiplier=dp.noise_multiplier,
        max_grad_norm=dp.clipping_norm,
        expected_batch_size=dp.expected_batch,
        loss_reduction="mean",
        generator=noise,
    )
    return module, dp_optimizer


def empty_step(optimizer: DPOptimizer) -> None:
    """A step on an empty Poisson sample: no gradient, only the noise (as Opacus does)."""
    for p in optimizer.params:
        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
    optimizer.step()


def release(module: GradSampleModule) -> None:
    """Remove Opacus' hooks and per-example gradients from the wrapped model."""
    module._close()
