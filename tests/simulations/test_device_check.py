"""Tests of fedtune.simulations.device_check: the site's training path measured per device."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fedtune.common.adapters import get_adapter_arrays, set_adapter_arrays
from fedtune.common.config import parse_run_config
from fedtune.common.data import split
from fedtune.common.model import PeftSpec, build_peft_model, load_tokenizer
from fedtune.common.sites import load_configured
from fedtune.common.train import train_local
from fedtune.simulations import device_check

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def run_config(tiny_base_model: Path) -> dict[str, str]:
    return {
        "task": "diabetes",
        "max-examples": "96",
        "batch-size": "16",
        "base-model": str(tiny_base_model),
    }


def test_warm_up_does_not_change_the_measured_training(run_config: dict[str, str]) -> None:
    """The row trains from the initial adapter, as a site would, not from the warm-up's result."""
    cfg = parse_run_config(run_config)
    data = load_configured(cfg)
    train_set, _ = split(data, cfg.test_fraction, cfg.seed)
    model_dir = Path(cfg.base_model)
    model = build_peft_model(
        PeftSpec.from_config(cfg, model_dir, len(data.label_names))
    )  # cached: the one check uses
    initial = get_adapter_arrays(model)

    (row,) = device_check.check(["cpu"], run_config)
    set_adapter_arrays(model, initial)
    direct = train_local(
        model,
        load_tokenizer(model_dir),
        train_set,
        cfg,
        device=torch.device("cpu"),
        seed=cfg.seed,
        server_round=1,
    )

    assert row["train_loss"] == pytest.approx(direct.loss, rel=1e-6)
    assert row["device"] == "cpu" and row["autocast"] == "None"
    assert row["frozen_base_unchanged"] is True
    assert row["train_examples_per_second"] > 0


def test_cli_writes_json_and_table(run_config: dict[str, str], tmp_path: Path) -> None:
    overrides = " ".join(f"{k}={v}" for k, v in run_config.items())
    device_check.main(["--devices", "cpu,cpu", "--run-config", overrides, "--out", str(tmp_path)])

    table = (tmp_path / "device_check.md").read_text()
    assert "Training speed cpu / cpu" in table
    rows = json.loads((tmp_path / "device_check.json").read_text())["rows"]
    assert [r["requested"] for r in rows] == ["cpu", "cpu"]
    assert rows[0]["train_loss"] == pytest.approx(rows[1]["train_loss"], rel=1e-6)
