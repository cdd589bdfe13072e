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
