"""End-to-end: real Flower simulations through the ``fedtune simulate`` CLI (run with ``--run-e2e``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fedtune.common.config import parse_run_config
from fedtune.common.sites import coordinator_test_set
from peft import PeftModel
from safetensors.numpy import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

pytestmark = pytest.mark.e2e

SMOKE = "num-server-rounds=2 max-examples=600 partitioning=iid"


def simulate(out: Path, run_config: str, num_clients: int = 3) -> list[dict]:
    cmd = [
        sys.executable,
        "-m",
        "fedtune.simulations.cli",
        "simulate",
        "--num-clients",
        str(num_clients),
        "--out",
        str(out),
        "--run-config",
        run_config,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.parametrize("method", ["lora", "prefix"])
def test_simulation_adapter_loads_with_plain_peft_and_scores_as_recorded(tmp_path: Path, method: str) -> None:
    # Prepare / Execute
    out = tmp_path / method
    records = simulate(out, f"{SMOKE} peft-method={method}")

    # Assert: one record per round (plus the initial adapter) with the promised fields
    assert [r["round"] for r in records] == [0, 1, 2]
    for r in records[1:]:
        for key in (
            "accuracy",
            "macro_f1",
            "sites_accuracy",
            "train_loss",
            "bytes_up",
            "bytes_down",
            "seconds",
        ):
            assert r[key] is not None and r[key] >= 0, key
        assert r["bytes_up"] > 0 and len(r["bytes_up_per_site"]) == 3
    # the adapter stays float32 under SecAgg+: later rounds download no more than the first
    assert records[2]["bytes_down"] <= 1.01 * records[1]["bytes_down"]
    assert (out / "run_config.json").is_file() and (out / "plots" / "quality.png").is_file()
    meta = json.loads((out / "adapter" / "fedtune.json").read_text())
    assert meta["peft_method"] == method and len(meta["base_model_fingerprint"]) == 64
    assert 0 < meta["trainable_percent"] < 1

    # Assert: plain transformers + peft (no fedtune) reproduce the recorded held-out accuracy
    base = AutoModelForSequenceClassification.from_pretrained(
        meta["base_model"], num_labels=len(meta["label_names"])
    )
    model = PeftModel.from_pretrained(base, out / "adapter").eval()
    tokenizer = AutoTokenizer.from_pretrained(meta["base_model"])
    cfg = parse_run_config(json.loads((out / "run_config.json").read_text()))
    test = coordinator_test_set(cfg)
    with torch.no_grad():
        enc = tokenizer(
            list(test.texts),
            truncation=True,
            max_length=meta["max_length"],
            padding=True,
            return_tensors="pt",
        )
        pred = model(**enc).logits.argmax(-1).numpy()
    accuracy = float((pred == test.labels).mean())
    assert abs(accuracy - records[-1]["accuracy"]) <= 1.0 / len(test) + 1e-9


def test_secagg_aggregate_matches_plain_average_within_quantisation(tmp_path: Path) -> None:
    # Prepare: the same seeded round with and without SecAgg+, at 2 sites of more than 1,000 training
    # examples each (above Flower's default `max_weight`, which would clip their weights)
    one_round = "num-server-rounds=1 max-examples=3200 partitioning=iid fraction-evaluate=0 max-length=24"
    masked = simulate(tmp_path / "secagg", f"{one_round} secure-aggregation=true", num_clients=2)
    plain = simulate(tmp_path / "plain", f"{one_round} secure-aggregation=false", num_clients=2)

    # Execute
    a = load_file(str(tmp_path / "secagg" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "plain" / "adapter" / "adapter_model.safetensors"))
    meta = json.loads((tmp_path / "secagg" / "adapter" / "fedtune.json").read_text())
    cfg = parse_run_config(json.loads((tmp_path / "secagg" / "run_config.json").read_text()))

    # Assert: every value within the SecAgg+ quantisation error bound, yet the upload was really masked
    sites = masked[1]["site_train_examples"]
    assert min(sites) > 1000 and sites == plain[1]["site_train_examples"]
    step = 2 * cfg.secagg_clipping_range / (cfg.secagg_quantization_range - 1)
    bound = len(sites) * step * meta["secagg_max_weight"] / sum(sites)  # one step per site, unweighted
    assert a.keys() == b.keys()
    max_err = max(float(np.abs(a[k] - b[k]).max()) for k in a)
    assert 0 < max_err <= bound, (max_err, bound)
    assert masked[1]["bytes_up"] > 1.8 * plain[1]["bytes_up"]  # int64 masked vectors vs fp32 arrays
