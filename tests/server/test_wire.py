"""SecAgg+ masked vectors cross the wire narrow and are summed exactly as Flower's int64 path sums them."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from conftest import fake_task_identity
from fedtune.client.mods import narrow_masked_reply
from fedtune.server.wire import widen_masked_reply
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common import bytes_to_ndarray, ndarray_to_bytes
from flwr.common.secure_aggregation.ndarrays_arithmetic import parameters_addition, parameters_mod

MOD = 2**32  # Flower's default modulus range


@pytest.fixture(autouse=True)
def _task() -> Iterator[None]:
    with fake_task_identity():
        yield


def _reply(vectors: list[np.ndarray]) -> Message:
    request = Message(content=RecordDict(), dst_node_id=1, message_type="train", group_id="1")
    record = ConfigRecord({"masked_params": [ndarray_to_bytes(v) for v in vectors]})
    return Message(RecordDict({"secaggplus_configs": record}), reply_to=request)


def _masked(reply: Message) -> list[np.ndarray]:
    return [bytes_to_ndarray(b) for b in reply.content.config_records["secaggplus_configs"]["masked_params"]]


def _flower_sum(per_site: list[list[np.ndarray]]) -> list[np.ndarray]:
    """Flower's ``collect_masked_vectors_stage``: add the sites' vectors, then reduce modulo the range."""
    total = per_site[0]
    for vectors in per_site[1:]:
        total = parameters_addition(total, vectors)
    return parameters_mod(total, MOD)


def test_narrowed_then_widened_vectors_sum_to_what_the_int64_path_sums() -> None:
    # Prepare: 3 sites' masked vectors as Flower's secaggplus_mod makes them (int64 in [0, 2**32)),
    # a weight factor and two parameter arrays, with the range's extremes
    rng = np.random.default_rng(1)
    sites = [
        [np.array([rng.integers(0, MOD)]), rng.integers(0, MOD, (64, 32)), np.array([0, MOD - 1, MOD - 2])]
        for _ in range(3)
    ]
    replies = [_reply(vectors) for vectors in sites]

    # Execute: each site narrows its reply, the coordinator widens what it received
    sent_bytes = []
    for reply in replies:
        narrow_masked_reply(reply, MOD)
        sent_bytes.append(sum(a.nbytes for a in _masked(reply)))
        assert {a.dtype for a in _masked(reply)} == {np.dtype(np.uint32)}
        widen_masked_reply(reply)

    # Assert: int64 again, and Flower's sum identical to the int64 path's
    received = [_masked(reply) for reply in replies]
    assert {a.dtype for vectors in received for a in vectors} == {np.dtype(np.int64)}
    for got, want in zip(_flower_sum(received), _flower_sum(sites), strict=True):
        np.testing.assert_array_equal(got, want)
    assert sent_bytes[0] * 2 == sum(a.nbytes for a in sites[0])  # 4 bytes a value instead of 8


def test_replies_without_a_masked_vector_pass_unchanged() -> None:
    # Prepare: a key-sharing reply (no masked vector), and an error-free reply without SecAgg+
    keys = _reply([])
    keys.content.config_records["secaggplus_configs"] = ConfigRecord({"pk1": b"key", "pk2": b"key2"})
    plain = _reply([])
    del plain.content.config_records["secaggplus_configs"]

    # Execute
    narrow_masked_reply(keys, MOD)
    widen_masked_reply(keys)
    widen_masked_reply(plain)

    # Assert
    assert dict(keys.content.config_records["secaggplus_configs"]) == {"pk1": b"key", "pk2": b"key2"}
    assert len(plain.content.config_records) == 0
