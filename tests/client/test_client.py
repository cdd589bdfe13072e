"""Tests of the site-side checks, the per-round instruction, and the server's wire metering."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from fedtune.client.mods import check_secagg_range
from fedtune.common import instructions
from fedtune.common.audit import payload_bytes
from fedtune.common.config import FedConfig
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

# ---- check_secagg_range ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("peak", "num_examples", "max_weight", "clip"),
    [
        (1.0, 100, 100.0, 8.0),
        (8.0, 100, 100.0, 8.0),  # exactly at the clipping range
        (4.0, 50, 100.0, 2.0),  # weighted 4 x 50 / 100 = 2
        (-7.5, 10, 10.0, 8.0),  # magnitude counts
        (100.0, 1, 1000.0, 0.5),  # small weight shrinks a large value
    ],
)
def test_check_secagg_range_accepts_values_that_fit(
    peak: float, num_examples: int, max_weight: float, clip: float
) -> None:
    # Prepare
    arrays = [np.array([[0.0, peak], [0.1, -0.1]], np.float32), np.zeros(0, np.float32)]

    # Execute / Assert: no error
    check_secagg_range(arrays, num_examples, max_weight, clip)


def test_more_examples_than_max_weight_names_secagg_max_weight() -> None:
    # Prepare
    arrays = [np.ones(3, np.float32)]

    # Execute
    with pytest.raises(ValueError) as excinfo:
        check_secagg_range(arrays, num_examples=101, max_weight=100.0, clip=8.0)

    # Assert
    message = str(excinfo.value)
    assert "`secagg-max-weight`" in message and "101" in message and "100" in message


@pytest.mark.parametrize(
    ("peak", "num_examples", "max_weight", "clip"),
    [
        (8.5, 100, 100.0, 8.0),
        (-9.0, 100, 100.0, 8.0),
        (4.0, 60, 100.0, 2.0),  # weighted 2.4
    ],
)
def test_value_beyond_clipping_range_names_secagg_clipping_range(
    peak: float, num_examples: int, max_weight: float, clip: float
) -> None:
    # Prepare
    arrays = [np.zeros((2, 2), np.float32), np.array([0.5, peak], np.float32)]

    # Execute
    with pytest.raises(ValueError) as excinfo:
        check_secagg_range(arrays, num_examples, max_weight, clip)

    # Assert
    message = str(excinfo.value)
    assert "`secagg-clipping-range`" in message
    assert f"{abs(peak) * num_examples / max_weight:.3g}" in message


# ---- instructions -----------------------------------------------------------------------------------------


def _config() -> FedConfig:
    return FedConfig(strategy="fedprox", fedprox_mu=0.2, peft_method="prefix", num_server_rounds=7, seed=3)


@pytest.mark.parametrize("as_record", [False, True])
def test_instruction_round_trip(as_record: bool) -> None:
    # Prepare
    cfg = _config()
    encoded = instructions.encode(cfg, server_round=4, base_fingerprint="ab" * 32, dp_noise_std=0.25)
    config: Any = ConfigRecord(encoded) if as_record else encoded  # what travels in a Flower message

    # Execute
    ins = instructions.decode(config)

    # Assert
    assert ins == instructions.Instruction(
        cfg=cfg, server_round=4, base_fingerprint="ab" * 32, dp_noise_std=0.0, proximal_mu=0.0
    )
    assert instructions.DP_NOISE_STD not in encoded  # DP off: no noise share, no clipping norm


def test_instruction_carries_proximal_mu_and_ignores_foreign_keys() -> None:
    # Prepare
    config = {
        **instructions.encode(_config(), 2, "f" * 64),
        instructions.PROXIMAL_MU: 0.2,
        "some-other-app-key": "ignored",
    }

    # Execute
    ins = instructions.decode(config)

    # Assert
    assert ins.proximal_mu == 0.2
    assert ins.cfg == _config()
    assert instructions.PROXIMAL_MU == "proximal_mu"  # the key Flower's FedProx sets


@pytest.mark.parametrize("mode", ["distributed", "central"])
def test_dp_instruction_carries_clipping_norm_for_flowers_mod_and_the_noise_share(mode: str) -> None:
    # Prepare
    cfg = FedConfig(dp_mode=mode, dp_clipping_norm=0.7)

    # Execute
    config = instructions.encode(cfg, 1, "0" * 64, dp_noise_std=0.3)

    # Assert
    assert config[instructions.CLIPPING_NORM] == 0.7 and config["clipping_norm"] == 0.7
    assert instructions.decode(config).dp_noise_std == 0.3


@pytest.mark.parametrize("missing", [instructions.ROUND, instructions.BASE_FINGERPRINT])
def test_instruction_missing_key_is_refused(missing: str) -> None:
    # Prepare
    config = instructions.encode(FedConfig(), 1, "0" * 64)
    del config[missing]

    # Execute
    with pytest.raises(ValueError) as excinfo:
        instructions.decode(config)

    # Assert
    assert f"`{missing}`" in str(excinfo.value) and "fedtune server" in str(excinfo.value)


# ---- wire.payload_bytes ---------------------------------------------------------------------------------


def _message(content: RecordDict) -> Message:
    return Message(content=content, dst_node_id=1, message_type="train", group_id="3")


def test_payload_bytes_counts_exactly_the_array_bytes(task_identity: None) -> None:
    # Prepare
    arrays = [np.zeros((3, 4), np.float32), np.ones(5, np.float64), np.arange(7, dtype=np.int64)]
    record = ArrayRecord(arrays)
    serialised = sum(len(arr.data) for arr in record.values())
    msg = _message(RecordDict({"arrays": record}))

    # Execute
    counted = payload_bytes(msg)

    # Assert
    assert counted == serialised
    assert all(isinstance(arr, Array) for arr in record.values())
    assert counted >= sum(a.nbytes for a in arrays)


def test_payload_bytes_grows_by_exactly_the_added_array_bytes(task_identity: None) -> None:
    # Prepare
    small = _message(RecordDict({"arrays": ArrayRecord([np.zeros(10, np.float32)])}))
    large = _message(RecordDict({"arrays": ArrayRecord([np.zeros(1010, np.float32)])}))

    # Execute
    growth = payload_bytes(large) - payload_bytes(small)

    # Assert
    assert growth == 1000 * 4


def test_payload_bytes_sums_all_records(task_identity: None) -> None:
    # Prepare
    arrays = ArrayRecord([np.zeros(4, np.float32)])
    content = RecordDict(
        {
            "arrays": arrays,
            "config": ConfigRecord({"ab": 1, "c": "xyz", "d": b"\x00\x01", "e": [1.0, 2.0]}),
            "metrics": MetricRecord({"loss": 0.5}),
        }
    )

    # Execute
    counted = payload_bytes(_message(content))

    # Assert: keys as UTF-8 bytes; str/bytes values by length; 8 bytes per number
    config_bytes = (2 + 8) + (1 + 3) + (1 + 2) + (1 + 16)
    metric_bytes = 4 + 8
    assert counted == sum(len(a.data) for a in arrays.values()) + config_bytes + metric_bytes


def test_payload_bytes_of_an_error_reply_is_zero(task_identity: None) -> None:
    # Prepare
    request = _message(RecordDict({"arrays": ArrayRecord([np.zeros(4, np.float32)])}))
    reply = Message(Error(code=0, reason="site failed"), reply_to=request)

    # Execute / Assert
    assert payload_bytes(reply) == 0
