"""Audit report pieces on hand-made records: offenders found, totals right, bad folders refused."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from fedtune.common.audit import WireLog, content_arrays, content_tensors, save_arrays
from fedtune.common.audit_report import (
    AuditError,
    build_report,
    offending_uploads,
    secagg_check,
    tensors_exchanged,
)
from fedtune.common.config import FedConfig

SHAPES = [[4, 3], [3]]


def _t(name: str, shape: list[int], dtype: str = "float32") -> dict:
    return {"name": name, "shape": shape, "dtype": dtype, "bytes": 8, "sha256": name}


def _up(tensors: list[dict], stage: str = "", node: int = 1) -> dict:
    return {
        "direction": "up",
        "node": node,
        "round": 1,
        "stage": stage,
        "tensors": tensors,
        "payload_bytes": 100,
    }


PLAIN = _up([_t("fitres.parameters.0", [4, 3]), _t("fitres.parameters.1", [3])])
MASKED = _up(
    [
        _t("secaggplus_configs.masked_params[0]", [1], "int64"),
        _t("secaggplus_configs.masked_params[1]", [4, 3], "int64"),
        _t("secaggplus_configs.masked_params[2]", [3], "int64"),
    ],
    "collect_masked_vectors",
)
KEYS = _up([_t("secaggplus_configs.pk1", [215], "bytes")], "setup")


@pytest.mark.parametrize("records", [[PLAIN], [MASKED, KEYS], [KEYS]])
def test_adapter_uploads_plain_or_masked_are_clean(records: list[dict]) -> None:
    # Execute / Assert
    assert offending_uploads(records, SHAPES) == []


@pytest.mark.parametrize(
    ("smuggled", "why"),
    [
        (_t("fitres.parameters.2", [384, 384]), "an extra base-model-shaped tensor"),
        (_t("fitres.parameters.1", [30522, 384]), "a tensor of the wrong shape in an adapter slot"),
        (_t("fitmetrics.embedding", [8]), "an unknown tensor"),
    ],
)
def test_a_smuggled_tensor_is_named(smuggled: dict, why: str) -> None:
    # Prepare
    record = {
        **PLAIN,
        "tensors": [PLAIN["tensors"][0], smuggled]
        if "parameters.1" in smuggled["name"]
        else [*PLAIN["tensors"], smuggled],
    }

    # Execute
    bad = offending_uploads([record], SHAPES)

    # Assert
    assert bad, why
    assert any(b["name"] == smuggled["name"] or "parameter tensors" in b["name"] for b in bad)


def test_totals_and_ratio_to_the_full_model() -> None:
    # Prepare
    records = [
        {"direction": "down", "node": 1, "round": 1, "stage": "", "tensors": [1, 2], "payload_bytes": 300},
        {"direction": "up", "node": 1, "round": 1, "stage": "", "tensors": [1], "payload_bytes": 100},
        {"direction": "up", "node": 2, "round": 1, "stage": "", "tensors": [1], "payload_bytes": 200},
    ]

    # Execute
    tx = tensors_exchanged(records, base_model_bytes=1000)

    # Assert
    assert tx["totals"]["up"] == {"messages": 2, "tensors": 2, "bytes": 300}
    assert tx["bytes_per_site_per_round"]["up"] == 150 and tx["up_ratio_to_full_model"] == 0.15
    assert tx["per_site"]["2"] == {"down": 0, "up": 200}


def _fake_run(tmp_path: Path, secure: bool, masked_noise: bool) -> tuple[Path, FedConfig]:
    rng = np.random.default_rng(0)
    glob = [rng.normal(size=(40, 30)).astype(np.float32), rng.normal(size=30).astype(np.float32)]
    server = tmp_path / "audit" / "server"
    save_arrays(server / "global-round-001.npz", glob)
    updates = []
    for node in (11, 12):
        update = [rng.normal(size=a.shape).astype(np.float32) * 0.1 for a in glob]
        sent = [g + u for g, u in zip(glob, update, strict=True)]
        site = tmp_path / "audit" / "sites" / f"site-{node}"
        save_arrays(site / "global-round-001.npz", glob)
        save_arrays(site / "sent-round-001.npz", sent, num_examples=10.0, node=float(node))
        received = (
            [np.array([1])] + [rng.integers(0, 2**32, size=a.shape) for a in glob] if masked_noise else sent
        )
        save_arrays(server / f"received-round-001-node-{node}.npz", received)
        updates.append(update)
    mean = [g + (u1 + u2) / 2 for g, u1, u2 in zip(glob, *updates, strict=True)]
    save_arrays(server / "global-final.npz", mean)
    return tmp_path / "audit", FedConfig(secure_aggregation=secure)


def test_secagg_check_is_green_for_masked_uploads(tmp_path: Path) -> None:
    # Prepare
    audit_dir, cfg = _fake_run(tmp_path, secure=True, masked_noise=True)

    # Execute
    result = secagg_check(audit_dir, cfg, max_weight=20.0)

    # Assert
    assert result["masked"] and result["max_abs_correlation"] < 0.9
    assert result["aggregate_within_bound"] and result["aggregate_max_abs_error"] < 1e-6


def _two_rounds(tmp_path: Path, step: Callable[[int, np.ndarray, np.ndarray], np.ndarray]) -> Path:
    """Two clear rounds of two sites; the coordinator's next adapter is ``step(round, old, average)``."""
    rng = np.random.default_rng(1)
    glob = rng.normal(size=12).astype(np.float64)
    server = tmp_path / "audit" / "server"
    for r in (1, 2):
        save_arrays(server / f"global-round-{r:03d}.npz", [glob])
        sent = [glob + rng.normal(size=12) * 0.1 for _ in range(2)]
        for node, vec in zip((11, 12), sent, strict=True):
            site = tmp_path / "audit" / "sites" / f"site-{node}"
            save_arrays(site / f"global-round-{r:03d}.npz", [glob])
            save_arrays(site / f"sent-round-{r:03d}.npz", [vec], num_examples=10.0, node=float(node))
            save_arrays(server / f"received-round-{r:03d}-node-{node}.npz", [vec])
        glob = step(r, glob, (sent[0] + sent[1]) / 2)
    save_arrays(server / "global-final.npz", [glob])
    return tmp_path / "audit"


def test_the_aggregate_check_recomputes_fedavgms_momentum_step(tmp_path: Path) -> None:
    # Prepare: Flower's FedAvgM at lr 1.5, momentum 0.5: m1 = old - avg; m2 = 0.5 m1 + (old - avg)
    velocity: list[np.ndarray] = []

    def fedavgm(r: int, old: np.ndarray, avg: np.ndarray) -> np.ndarray:
        velocity.append(old - avg if r == 1 else 0.5 * velocity[-1] + (old - avg))
        return old - 1.5 * velocity[-1]

    cfg = FedConfig(secure_aggregation=False, strategy="fedavgm", fedavgm_lr=1.5, fedavgm_momentum=0.5)
    momentum_run = _two_rounds(tmp_path / "m", fedavgm)
    plain_run = _two_rounds(tmp_path / "p", lambda r, old, avg: avg)

    # Execute
    checked = secagg_check(momentum_run, cfg, max_weight=20.0)
    wrong_step = secagg_check(plain_run, cfg, max_weight=20.0)  # a coordinator that skipped the momentum

    # Assert
    assert checked["aggregate_within_bound"] and checked["aggregate_max_abs_error"] < 1e-9
    assert checked["aggregate_error_bound"] == pytest.approx(3 * 1e-5)  # lr / (1 - momentum) x 1e-5
    assert wrong_step["aggregate_within_bound"] is False
    adam = secagg_check(momentum_run, FedConfig(secure_aggregation=False, strategy="fedadam"), 20.0)
    assert adam["aggregate_within_bound"] is None
    assert "not comparable: strategy fedadam" in adam["aggregate_note"]


def test_secagg_check_turns_red_for_clear_uploads(tmp_path: Path) -> None:
    # Prepare
    audit_dir, cfg = _fake_run(tmp_path, secure=False, masked_noise=False)

    # Execute
    result = secagg_check(audit_dir, cfg, max_weight=20.0)

    # Assert
    assert not result["masked"] and result["max_abs_correlation"] > 0.99


@pytest.mark.parametrize(
    ("break_it", "message"),
    [
        (lambda d: (d / "run_config.json").unlink(), "run_config.json is missing"),
        (lambda d: (d / "adapter" / "fedtune.json").write_text("{oops"), "fedtune.json: corrupt JSON"),
        (lambda d: (d / "audit" / "server" / "wire.jsonl").unlink(), "audit=false"),
        (lambda d: (d / "audit" / "server" / "wire.jsonl").write_text("not json\n"), "line 1"),
        (lambda d: (d / "metrics.json").write_text('[{"round": 0}, {"rou'), "metrics.json is not valid JSON"),
        (lambda d: (d / "metrics.json").unlink(), "metrics.json is missing"),
    ],
)
def test_a_partial_or_corrupt_run_folder_is_a_clear_error(tmp_path: Path, break_it, message: str) -> None:
    # Prepare: a minimal well-formed run folder, then break one file
    (tmp_path / "adapter").mkdir()
    (tmp_path / "run_config.json").write_text(json.dumps(FedConfig().to_run_config()))
    (tmp_path / "adapter" / "fedtune.json").write_text(json.dumps({"adapter_shapes": SHAPES}))
    (tmp_path / "metrics.json").write_text(json.dumps([{"round": 0}]))
    WireLog(tmp_path / "audit" / "server" / "wire.jsonl").append(PLAIN)
    break_it(tmp_path)

    # Execute / Assert
    with pytest.raises(AuditError, match=message.replace(".", r"\.")):
        build_report(tmp_path)


class _Array:
    def __init__(self, arr: np.ndarray) -> None:
        import io

        buf = io.BytesIO()
        np.save(buf, arr)
        self.data, self.shape, self.dtype = buf.getvalue(), [], "numpy.ndarray"


def test_content_walk_finds_arrays_and_masked_byte_vectors() -> None:
    # Prepare: a legacy ArrayRecord array (shape not set) and a SecAgg+ masked vector list
    a, b = np.ones((2, 5), np.float32), np.arange(3, dtype=np.int64)
    content = {
        "fitres.parameters": {"0": _Array(a)},
        "secaggplus_configs": {"masked_params": [_Array(b).data], "pk1": b"key-bytes"},
    }

    # Execute
    tensors = {t["name"]: t for t in content_tensors(content)}
    arrays = content_arrays(content)

    # Assert
    assert (
        tensors["fitres.parameters.0"]["shape"] == [2, 5]
        and tensors["fitres.parameters.0"]["dtype"] == "float32"
    )
    assert tensors["secaggplus_configs.masked_params[0]"]["dtype"] == "int64"
    assert tensors["secaggplus_configs.pk1"]["dtype"] == "bytes"
    assert [x.shape for x in arrays] == [(2, 5), (3,)]
