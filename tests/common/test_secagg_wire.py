"""SecAgg+ masked vectors at their narrowest width (``common/secagg_wire.py``)."""

from __future__ import annotations

import numpy as np
import pytest
from fedtune.common.secagg_wire import narrow, widen, wire_dtype


@pytest.mark.parametrize(
    ("mod_range", "dtype"),
    [
        (2, np.uint8),
        (2**8, np.uint8),
        (2**8 + 1, np.uint16),
        (2**16, np.uint16),
        (2**16 + 1, np.uint32),
        (2**32, np.uint32),
    ],
)
def test_the_wire_dtype_is_the_narrowest_holding_the_modulus_range(mod_range: int, dtype: type) -> None:
    assert wire_dtype(mod_range) == np.dtype(dtype)


@pytest.mark.parametrize("mod_range", [1, 2**32 + 1])
def test_a_modulus_range_outside_flowers_bounds_is_refused(mod_range: int) -> None:
    with pytest.raises(ValueError, match=r"outside Flower's \[2, 2\*\*32\]"):
        wire_dtype(mod_range)


def test_narrow_then_widen_gives_back_every_value_at_the_edges_of_the_range() -> None:
    # Prepare: the extremes of [0, 2**32) and random values in between, as Flower ships them (int64)
    rng = np.random.default_rng(0)
    masked = np.concatenate([[0, 1, 2**31, 2**32 - 1], rng.integers(0, 2**32, size=1000)]).astype(np.int64)

    # Execute
    sent = narrow(masked, 2**32)
    back = widen(sent)

    # Assert: half the bytes on the wire, the same values back as int64
    assert sent.dtype == np.uint32 and sent.nbytes == masked.nbytes // 2
    assert back.dtype == np.int64
    np.testing.assert_array_equal(back, masked)


@pytest.mark.parametrize("bad", [[-1, 3], [0, 2**16]])
def test_narrow_refuses_a_value_outside_the_modulus_range(bad: list[int]) -> None:
    with pytest.raises(ValueError, match=r"outside the modulus range \[0, 65536\)"):
        narrow(np.array(bad, dtype=np.int64), 2**16)


def test_narrow_refuses_floats() -> None:
    with pytest.raises(ValueError, match="dtype float32; expected integers"):
        narrow(np.zeros(3, dtype=np.float32), 2**32)


def test_narrow_accepts_an_empty_vector() -> None:
    assert narrow(np.zeros(0, dtype=np.int64), 2**16).dtype == np.uint16


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32, np.int64])
def test_widen_accepts_every_wire_dtype_and_flowers_int64(dtype: type) -> None:
    assert widen(np.array([0, 7], dtype=dtype)).dtype == np.int64


@pytest.mark.parametrize("dtype", [np.uint64, np.int32, np.float32])
def test_widen_refuses_what_a_site_never_sends(dtype: type) -> None:
    with pytest.raises(ValueError, match=f"arrived as {np.dtype(dtype)}; expected uint8/16/32 or int64"):
        widen(np.array([1], dtype=dtype))
