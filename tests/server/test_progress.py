"""The live round lines and the results table a person reads during and after a run."""

from __future__ import annotations

import io

from fedtune.common.records import RoundRecord
from fedtune.server.progress import RunProgress, results_table
from rich.console import Console


def _console() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, width=200, force_terminal=False), buf


def test_round_line_and_table_show_the_figures_of_each_round(round_records: list[RoundRecord]) -> None:
    # Prepare
    console, buf = _console()

    # Execute
    RunProgress(3, console).round_done(round_records[1])
    console.print(results_table(round_records, "run"))
    text = buf.getvalue()

    # Assert
    assert "round 1/3" in text and "acc 0.6000" in text and "up 2.50 MB" in text and "s 12.3" in text
    assert "0.3000" in text and "3.00 MB" in text and "auc" not in text.lower()  # no AUC column without AUC


def test_the_round_line_shows_both_epsilons_under_dp(round_records: list[RoundRecord]) -> None:
    import dataclasses

    # Prepare
    console, buf = _console()
    record = dataclasses.replace(round_records[1], dp_epsilon=1.25, example_dp_epsilon=3.5)

    # Execute
    RunProgress(3, console).round_done(record)
    RunProgress(3, console).round_done(round_records[1])

    # Assert
    first, second = buf.getvalue().strip().splitlines()
    assert "ε client 1.2500" in first and "ε patient (max) 3.5000" in first
    assert "ε" not in second
