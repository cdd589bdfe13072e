"""Helpers for the tabular benchmarks: contiguous skewed splits and reading a serialised feature."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # heavy imports only where a benchmark trains in-process
    pass


def skewed_split(values: Sequence[float], num_sites: int) -> list[np.ndarray]:
    """Cut examples into ``num_sites`` contiguous blocks of a feature's sorted order.

    The indices are sorted by ``values`` (stable: ties keep their order) and cut into blocks of
    ``len // num_sites`` or one more, so site 0 holds the smallest values (e.g. the youngest
    patients) and the last site the largest.

    Raises
    ------
    ValueError
        When ``num_sites`` is not in ``1 .. len(values)``.
    """
    if not 1 <= num_sites <= len(values):
        raise ValueError(f"num_sites must be in 1..{len(values)}, got {num_sites}.")
    order = np.argsort(np.asarray(values, dtype=float), kind="stable").astype(np.int64)
    return [np.asarray(b) for b in np.array_split(order, num_sites)]


def feature_value(text: str, name: str) -> float:
    """The value of ``name`` in a row serialised as ``"name: value; ..."``.

    Raises
    ------
    ValueError
        When the row has no such feature.
    """
    match = re.search(rf"(?:^|;\s*){re.escape(name)}:\s*([-+0-9.eE]+)", text)
    if match is None:
        raise ValueError(f"No `{name}: <number>` in {text[:80]!r}.")
    return float(match.group(1))
