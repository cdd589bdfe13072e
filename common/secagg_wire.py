"""SecAgg+ masked vectors at the width their values need, not int64.

Flower's ``secaggplus_mod`` masks a site's quantised update modulo ``modulus_range``
(``<= 2**32``) and ships each array with numpy's default int64: twice the bytes of the fp32
adapter. Every masked value lies in ``[0, modulus_range)``, so a site sends them as the
narrowest unsigned dtype holding ``modulus_range - 1`` (:func:`narrow`, uint32 at Flower's
default) and the coordinator restores int64 (:func:`widen`) before Flower sums and unmasks
them: the arithmetic, and so the aggregate, is exactly Flower's.
"""

from __future__ import annotations

import numpy as np

_UNSIGNED = (np.uint8, np.uint16, np.uint32)
MAX_MOD_RANGE = 2**32  # Flower's bound on ``modulus_range``


def wire_dtype(mod_range: int) -> np.dtype:
    """The narrowest unsigned dtype holding every value of ``[0, mod_range)``.

    Raises
    ------
    ValueError
        When ``mod_range`` is below 2 or above ``2**32`` (Flower's bound).
    """
    if not 2 <= mod_range <= MAX_MOD_RANGE:
        raise ValueError(f"SecAgg+ modulus range {mod_range} is outside Flower's [2, 2**32].")
    return next(np.dtype(d) for d in _UNSIGNED if mod_range - 1 <= np.iinfo(d).max)


def narrow(arr: np.ndarray, mod_range: int) -> np.ndarray:
    """``arr`` (a masked vector, values in ``[0, mod_range)``) as :func:`wire_dtype` ``(mod_range)``.

    Raises
    ------
    ValueError
        When ``arr`` is not integer or holds a value outside ``[0, mod_range)`` (it would not survive
        the cast: the sum would be wrong, so nothing is sent).
    """
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"SecAgg+ masked vector has dtype {arr.dtype}; expected integers.")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= mod_range):
        raise ValueError(
            f"SecAgg+ masked vector holds values in [{int(arr.min())}, {int(arr.max())}], "
            f"outside the modulus range [0, {mod_range})."
        )
    return arr.astype(wire_dtype(mod_range), copy=False)


def widen(arr: np.ndarray) -> np.ndarray:
    """A masked vector as received (narrowed, or Flower's own int64) as int64 for Flower's sum.

    Raises
    ------
    ValueError
        When ``arr`` is neither an unsigned dtype of :func:`wire_dtype` nor int64.
    """
    if arr.dtype not in (*map(np.dtype, _UNSIGNED), np.dtype(np.int64)):
        raise ValueError(f"SecAgg+ masked vector arrived as {arr.dtype}; expected uint8/16/32 or int64.")
    return arr.astype(np.int64, copy=False)
