"""Small statistics of the benchmark tables: mean and std, bootstrap AUC intervals, per-site bytes."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
from fedtune.common.records import RoundRecord

if TYPE_CHECKING:  # heavy imports only where a benchmark trains in-process
    pass


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value); NaN for none."""
    arr = np.asarray([v for v in values if v is not None], dtype=float)
    if arr.size == 0:
        return math.nan, math.nan
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def pm(mean: float, std: float, digits: int = 3) -> str:
    """``"0.812 ± 0.010"``."""
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def auc_or_nan(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC of ``scores`` for binary ``labels``; NaN when ``labels`` holds a single class."""
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels)
    if len(np.unique(labels)) != 2:
        return float("nan")
    return float(roc_auc_score(labels, scores))


def bootstrap_auc_ci(
    labels: np.ndarray, scores: np.ndarray, *, resamples: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """ROC AUC and its percentile bootstrap CI over ``resamples`` seeded resamples of the test set.

    A resample holding a single class has no AUC and is drawn again (so exactly ``resamples`` count).

    Returns
    -------
    tuple[float, float, float]
        ``(auc, low, high)``.

    Raises
    ------
    ValueError
        When ``labels`` does not hold both classes.
    """
    from sklearn.metrics import roc_auc_score

    labels, scores = np.asarray(labels), np.asarray(scores, dtype=float)
    if len(np.unique(labels)) != 2:
        raise ValueError(f"ROC AUC needs both classes in the test set, got {np.unique(labels).tolist()}.")
    rng = np.random.default_rng(seed)
    aucs: list[float] = []
    while len(aucs) < resamples:
        idx = rng.integers(0, len(labels), len(labels))
        if labels[idx].min() != labels[idx].max():
            aucs.append(float(roc_auc_score(labels[idx], scores[idx])))
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(aucs, [tail, 100 - tail])
    return float(roc_auc_score(labels, scores)), float(low), float(high)


def per_site_mean(record: RoundRecord, key: str) -> float:
    """Mean over sites of a per-site byte count (``bytes_up_per_site`` / ``bytes_down_per_site``)."""
    values = list((getattr(record, key) or {}).values())
    return float(sum(values) / len(values)) if values else math.nan


def mean_over_rounds(records: Sequence[RoundRecord], fn: Callable[[RoundRecord], float]) -> float:
    """Mean of ``fn(record)`` over the rounds (round 0, the initial adapter, left out)."""
    values = [fn(r) for r in records if r.round > 0]
    return float(sum(values) / len(values)) if values else math.nan
