"""``fedtune bench scale``: its run configs, its targets and the memory it measures."""

from __future__ import annotations

import subprocess
import sys

from fedtune.simulations.benchmarks import scale
from fedtune.simulations.benchmarks.harness import PeakMemory
from fedtune.simulations.benchmarks.spec import Outcome


def _examples(n: int) -> int:
    config = scale.run_config(n, 4)
    return config["max-examples"] or scale.all_codes()


def test_every_hospital_count_gives_its_hospitals_the_same_share_and_10000_hold_every_code() -> None:
    assert scale.run_config(scale.LARGEST, 4)["max-examples"] == 0  # 0 = every code of the table
    per_site = {n: (_examples(n) - scale.HOLDOUT) / n for n in (10, 100, 1000, scale.LARGEST)}
    assert max(per_site.values()) - min(per_site.values()) < 0.1
    for n in (10, scale.LARGEST):
        config = scale.run_config(n, 4)
        assert round(config["holdout-fraction"] * _examples(n)) == scale.HOLDOUT
        assert round(config["fraction-train"] * n) == scale.SAMPLED == config["min-clients"]


def _row(n: int, dispatch: str, pss: float, growth: float) -> dict:
    return {"hospitals": n, "dispatch": dispatch, "peak_pss_gb": pss, "round_time_growth": growth}


def test_targets_read_fedtunes_arms_not_the_flower_dispatch_baseline() -> None:
    rows = [
        _row(10, "fedtune's", 2.0, 1.0),
        _row(100, "fedtune's", 2.1, 1.0),
        _row(1000, "fedtune's", 2.2, 1.1),
        _row(10_000, "fedtune's", 2.9, 1.15),
        _row(10_000, "Flower's", 9.0, 9.0),
    ]
    lines = scale.targets(Outcome(rows, []), scale.settings(False))
    assert len(lines) == 4 and all("met" in line and "missed" not in line for line in lines), lines
    rows[3] = _row(10_000, "fedtune's", 3.1, 1.3)
    lines = scale.targets(Outcome(rows, []), scale.settings(False))
    assert sum("missed" in line for line in lines) == 2, lines


def test_peak_memory_counts_a_child_process_and_shared_pages_once(monkeypatch) -> None:
    monkeypatch.setattr(PeakMemory, "PSS_EVERY", 1)  # PSS at every sample: the child lives 2 s
    # Prepare: a child that holds ~200 MB of its own memory for a moment
    code = "import time; b = bytearray(200 * 2**20); b[::4096] = b'x' * len(b[::4096]); time.sleep(2)"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys; subprocess.run(sys.argv[1:])",
            sys.executable,
            "-c",
            code,
        ]
    )
    # Execute
    with PeakMemory(proc.pid) as memory:
        proc.wait(timeout=60)
    # Assert: the grandchild's 200 MB are in both sums; PSS never exceeds RSS
    assert memory.peak_pss >= 200 * 2**20
    assert memory.peak_rss >= memory.peak_pss
