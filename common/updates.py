"""Whether a site's update is a usable adapter: numpy only, so a ClientApp checks it without torch."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def update_defect(arrays: Sequence[np.ndarray], shapes: Sequence[tuple[int, ...]]) -> str:
    """Why ``arrays`` is not a usable adapter of tensor ``shapes``, or ``""`` when it is.

    Checks the tensor count, each tensor's shape, and that every value is finite (no NaN/Inf).
    """
    if len(arrays) != len(shapes):
        return f"it has {len(arrays)} tensors, the adapter has {len(shapes)}"
    for index, (array, shape) in enumerate(zip(arrays, shapes, strict=True)):
        if tuple(array.shape) != tuple(shape):
            return f"tensor {index} has shape {tuple(array.shape)}, the adapter's is {tuple(shape)}"
        if not np.isfinite(array).all():
            return f"tensor {index} holds non-finite values (NaN/Inf)"
    return ""


def statistics_defect(arrays: Sequence[np.ndarray]) -> str:
    """Why ``arrays`` are not head statistics (:meth:`HeadStatistics.arrays`), or ``""`` when they are."""
    if len(arrays) != 2:
        return f"head statistics are 2 tensors, got {len(arrays)}"
    upper, cross = arrays
    k = cross.shape[0] if cross.ndim == 2 else -1
    if cross.ndim != 2 or upper.shape != (k * (k + 1) // 2,):
        return (
            f"head statistics of shapes {upper.shape} and {cross.shape} do not match "
            "(need (k (k + 1) / 2,), (k, C): an upper triangle, then k rows)"
        )
    if not (np.isfinite(upper).all() and np.isfinite(cross).all()):
        return "head statistics hold non-finite values (NaN/Inf)"
    return ""


def moments_defect(arrays: Sequence[np.ndarray]) -> str:
    """Why ``arrays`` are not feature moments (:meth:`FeatureMoments.arrays`), or ``""`` when they are."""
    if len(arrays) != 2:
        return f"feature moments are 2 tensors, got {len(arrays)}"
    mean, square = arrays
    if mean.ndim != 1 or mean.shape != square.shape:
        return f"feature moments of shapes {mean.shape} and {square.shape} do not match (need (d,), (d,))"
    if not (np.isfinite(mean).all() and np.isfinite(square).all()):
        return "feature moments hold non-finite values (NaN/Inf)"
    return ""
