"""How much a site trains in a round, at what learning rate, and against which label prior.

No Flower and no model here: pure functions of the run config and a site's labels, so the
coordinator, the sites and the benchmarks' centralized arms share one definition.

- :func:`steps_per_round`: ``local-epochs`` x batches of the site's data, or ``local-steps``.
- :class:`Schedule`: the learning-rate factor at each local step of the *whole run* (a site at
  round ``r`` continues where round ``r - 1`` stopped), from the :data:`SCHEDULES` registry.
- :class:`LogitTransform`: the label-skew correction applied to the training logits only, from the
  :data:`SKEW_CORRECTIONS` registry: logit adjustment (Menon et al., "Long-tail learning via logit
  adjustment", ICLR 2021; FedLC, Zhang et al., ICML 2022) adds ``tau * log(prior)``; restricted
  softmax (FedRS, Li & Zhan, KDD 2021) scales the logits of labels the site has no example of by
  ``alpha``. Scoring always uses the plain logits.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .config import FedConfig


def steps_per_round(examples: int, cfg: FedConfig) -> int:
    """Optimiser steps one site takes per round.

    ``local-epochs`` x ``ceil(examples / batch)`` when ``local-epochs`` > 0, else ``local-steps``.
    """
    if cfg.local_epochs > 0:
        return cfg.local_epochs * math.ceil(examples / cfg.batch_size)
    return cfg.local_steps


def _constant(step: int, total: int, warmup: int) -> float:
    return 1.0


def _cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# schedule name -> factor(step, total, warmup) on the peak learning rate (step counted from 0)
SCHEDULES: dict[str, Callable[[int, int, int], float]] = {"constant": _constant, "cosine": _cosine}


@dataclass(frozen=True)
class Schedule:
    """The learning-rate factor over ``total`` optimiser steps, ``warmup`` of them warming up linearly.

    ``cosine`` reaches the peak at step ``warmup - 1`` and decays to 0 after step ``total``;
    ``constant`` is always 1. A step past ``total`` keeps the last factor (a resumed run).
    """

    kind: str
    total: int
    warmup: int = 0
    offset: int = 0  # the first local step of this call within the run

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(
                f"`lr-schedule` {self.kind!r} is not supported; supported: {', '.join(SCHEDULES)}."
            )
        assert 0 <= self.warmup <= self.total, (self.warmup, self.total)

    def factor(self, step: int) -> float:
        """Factor at local step ``step`` of this call (run step ``offset + step``)."""
        return SCHEDULES[self.kind](self.offset + step, self.total, self.warmup)

    @classmethod
    def for_round(cls, cfg: FedConfig, server_round: int, round_steps: int) -> Schedule:
        """The schedule of a site taking ``round_steps`` per round, at ``server_round`` (from 1)."""
        total = cfg.num_server_rounds * round_steps
        return cls(
            cfg.lr_schedule,
            total=total,
            warmup=round(cfg.lr_warmup * total),
            offset=(server_round - 1) * round_steps,
        )


@dataclass(frozen=True)
class LogitTransform:
    """``logits * scale + offset`` over the label axis (shapes ``(num_labels,)``)."""

    scale: torch.Tensor
    offset: torch.Tensor

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """Transform ``(batch, num_labels)`` logits."""
        return logits * self.scale.to(logits.device) + self.offset.to(logits.device)


def label_counts(labels: np.ndarray, num_labels: int) -> np.ndarray:
    """Examples per label id, shape ``(num_labels,)``."""
    return np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_labels)[:num_labels]


def logit_adjustment(counts: np.ndarray, tau: float) -> LogitTransform:
    """Add ``tau * log(prior)``, prior = ``(count + 1) / (n + K)`` (a label the site lacks stays finite)."""
    counts = np.asarray(counts, dtype=np.float64)
    prior = (counts + 1.0) / (counts.sum() + len(counts))
    offset = torch.tensor(tau * np.log(prior), dtype=torch.float32)
    return LogitTransform(scale=torch.ones_like(offset), offset=offset)


def restricted_softmax(counts: np.ndarray, alpha: float) -> LogitTransform:
    """Multiply the logits of labels with no example at the site by ``alpha`` (FedRS)."""
    scale = torch.tensor(np.where(np.asarray(counts) > 0, 1.0, alpha), dtype=torch.float32)
    return LogitTransform(scale=scale, offset=torch.zeros_like(scale))


# `label-skew` name -> the transform for a site's label counts (None = plain logits)
SKEW_CORRECTIONS: dict[str, Callable[[np.ndarray, FedConfig], LogitTransform | None]] = {
    "none": lambda counts, cfg: None,
    "logit-adjust": lambda counts, cfg: logit_adjustment(counts, cfg.logit_adjust_tau),
    "restricted-softmax": lambda counts, cfg: restricted_softmax(counts, cfg.restricted_softmax_alpha),
}


def skew_transform(cfg: FedConfig, labels: np.ndarray, num_labels: int) -> LogitTransform | None:
    """The ``label-skew`` correction for a site whose training labels are ``labels``."""
    if cfg.label_skew not in SKEW_CORRECTIONS:
        raise ValueError(
            f"`label-skew` {cfg.label_skew!r} is not supported; supported: {', '.join(SKEW_CORRECTIONS)}."
        )
    return SKEW_CORRECTIONS[cfg.label_skew](label_counts(labels, num_labels), cfg)
