"""``fedtune bench head``: the solved head's scores, and both arms paired round by round."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fedtune.simulations.benchmarks import head as bench_head

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_solved_head_is_the_lda_head_of_all_training_examples_together(tiny_base_model: Path) -> None:
    from fedtune.common.adapters import get_adapter_arrays
    from fedtune.common.config import parse_run_config
    from fedtune.common.head_fit import HeadStatistics, head_inputs, solve_lda
    from fedtune.common.model import bring_up
    from fedtune.common.sites import coordinator_test_set, simulated_site
    from fedtune.common.train import evaluate, score
    from fedtune.simulations.benchmarks.training import concat

    # Prepare: the Pima table over 3 sites, the seeded initial adapter
    cfg = parse_run_config({"task": "diabetes", "base-model": str(tiny_base_model), "max-length": 32})
    parts = bring_up(cfg, 2)
    arrays = get_adapter_arrays(parts.model)

    # Execute
    got = bench_head.score_heads(cfg, 3, [arrays])[0]

    # Assert: by hand, from every site's training split taken together (not site by site)
    kw = {"batch_size": cfg.batch_size, "max_length": cfg.max_length, "device": parts.device}
    sites = [simulated_site(cfg, i, 3) for i in range(3)]
    train, validation = concat([s.train for s in sites]), concat([s.test for s in sites])
    test = coordinator_test_set(cfg)
    stats = HeadStatistics.of(head_inputs(parts.model, parts.tokenizer, train, **kw), train.labels, 2)
    assert got["shrinkage"] in bench_head.SHRINKAGES
    weight, bias = solve_lda(stats, got["shrinkage"])
    logits = head_inputs(parts.model, parts.tokenizer, test, **kw) @ weight.T + bias
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    expected = score(probs / probs.sum(axis=1, keepdims=True), test.labels, 2)
    assert got["solved_test_f1"] == pytest.approx(expected.macro_f1)
    assert got["solved_test_acc"] == pytest.approx(expected.accuracy)
    shared = evaluate(parts.model, parts.tokenizer, validation, **kw)
    assert got["shared_val_f1"] == pytest.approx(shared.macro_f1)
    # the shared head's scores read from the solve's features are those of scoring the model itself
    unsolved = bench_head.score_heads(cfg, 3, [arrays], solve=False)[0]
    assert unsolved["solved_test_f1"] is None
    assert (unsolved["shared_test_f1"], unsolved["shared_test_acc"]) == pytest.approx(
        (got["shared_test_f1"], got["shared_test_acc"])
    )


def _curve(shared: list[float], solved: list[float] | None) -> dict[str, Any]:
    return {
        "curve": [
            {
                "round": r,
                "shared_val_f1": f,
                "shared_test_f1": f + 0.01,
                "shared_test_acc": 0.5 + f,
                "solved_val_f1": solved[r] if solved else None,
                "solved_test_f1": solved[r] + 0.01 if solved else None,
                "solved_test_acc": 0.9 if solved else None,
                "shrinkage": 0.1 if solved else None,
            }
            for r, f in enumerate(shared)
        ]
    }


def test_both_arms_run_per_seed_and_pair_round_by_round(tmp_path: Path, monkeypatch) -> None:
    # Prepare: stand-in runs; the averaged arm is the one asked to solve a head
    monkeypatch.chdir(tmp_path)
    calls: list[tuple[str, str, bool]] = []

    def curve(label: str, config: dict, sites: int, *, solve: bool) -> dict[str, Any]:
        calls.append((label, config["head-fit"], solve))
        assert sites == 3 and config["audit"] == "true" and config["num-server-rounds"] == 2
        return _curve([0.1, 0.2, 0.3], [0.4, 0.5, 0.6]) if solve else _curve([0.2, 0.5, 0.6], None)

    monkeypatch.setattr(bench_head, "head_curve", curve)

    # Execute
    data = json.loads(bench_head.BENCHMARK.run(True).read_text())

    # Assert
    assert calls == [("seed42-averaged", "none", True), ("seed42-lda", "lda", False)]
    rows = data["rows"]
    assert [r["round"] for r in rows] == [0, 1, 2]
    last = rows[-1]
    assert (last["averaged_test_f1"], last["lda_test_f1"], last["solved_test_f1"]) == pytest.approx(
        (0.31, 0.61, 0.61)
    )
    assert last["test_f1_ratio"] == pytest.approx(0.61 / 0.31)
    note = data["notes"][-1]
    assert "averaged head 31.0, head-fit=lda 61.0 (1.97x" in note
    assert "(round 0) 41.0" in note and "best validation round (2): 61.0" in note
    assert (tmp_path / "results" / "head_f1.png").read_bytes()[:4] == b"\x89PNG"
