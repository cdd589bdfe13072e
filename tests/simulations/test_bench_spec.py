"""``Benchmark``: the one run every benchmark driver shares, and its target lines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fedtune.simulations.benchmarks.spec import Benchmark, Outcome, target_note


def test_run_measures_the_modes_settings_plots_the_outcome_and_writes_targets_and_settings(
    tmp_path: Path, monkeypatch
) -> None:
    # Prepare: a benchmark whose every step records what it received
    monkeypatch.chdir(tmp_path)
    calls: list[tuple[str, object]] = []

    def measure(s: dict) -> Outcome:
        calls.append(("measure", s))
        return Outcome([{"arm": "a", "score": 0.5, "hidden": 1}], ["how it was measured"], {"raw": [1, 2]})

    def plot(outcome: Outcome, s: dict) -> None:
        calls.append(("plot", (outcome.rows[0]["arm"], s["sites"])))

    bench = Benchmark(
        name="demo",
        settings=lambda quick: {"sites": 2 if quick else 9},
        measure=measure,
        columns=("arm", "score"),
        plot=plot,
        targets=lambda outcome, s: [f"target on {len(outcome.rows)} row(s) at {s['sites']} sites"],
    )

    # Execute
    path = bench.run(quick=True)

    # Assert
    assert calls == [("measure", {"sites": 2}), ("plot", ("a", 2))]
    data = json.loads(path.read_text())
    assert path == Path("results/demo.json") and data["quick"] is True
    assert data["settings"] == {"sites": 2} and data["raw"] == [1, 2]
    assert data["notes"] == ["how it was measured", "target on 1 row(s) at 2 sites"]
    md = (tmp_path / "results" / "demo.md").read_text()
    assert "| arm | score |" in md and "hidden" not in md


@pytest.mark.parametrize(
    ("value", "at_most", "verdict"),
    [
        (1.05, True, "met"),
        (1.10, True, "met"),
        (1.2, True, "missed"),
        (0.9, False, "missed"),
        (1.1, False, "met"),
    ],
)
def test_target_note_judges_the_value_against_the_bound(value: float, at_most: bool, verdict: str) -> None:
    # Execute
    note = target_note("ratio at 20 sites", value, 1.10, at_most=at_most, unit="x")

    # Assert
    sign = "<=" if at_most else ">="
    assert note == f"ratio at 20 sites: {value:.2f}x (target {sign} 1.10x: {verdict})."


def test_target_note_says_when_the_run_did_not_measure_the_figure() -> None:
    # Execute / Assert
    assert target_note("peak at 1000", None, 6.0, at_most=True, unit=" GB", digits=1) == (
        "peak at 1000: not measured in this run (target <= 6.0 GB)."
    )
