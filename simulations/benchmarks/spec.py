"""One benchmark's description: what a driver declares, and the run every driver shares.

A driver module holds only what is particular to it (its settings, how it measures its arms, its
table's columns, its plot and its targets) and declares them as one :class:`Benchmark` named
``BENCHMARK``; :meth:`Benchmark.run` does the rest the same way for every benchmark: settings of
the mode, measure, plot, targets, then ``results/NAME.{json,md}`` with the settings saved beside
the rows (:func:`~.harness.write_results`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .harness import write_results

Settings = dict[str, Any]


@dataclass(frozen=True)
class Outcome:
    """What a benchmark measured.

    Attributes
    ----------
    rows
        One dict per row of the results table (and of ``results/NAME.json``'s ``rows``).
    notes
        How the rows were measured and what they show (the targets come from :attr:`Benchmark.targets`).
    extra
        Anything else saved in ``results/NAME.json`` (run configs, raw timings, ...).
    """

    rows: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def no_targets(outcome: Outcome, s: Settings) -> list[str]:
    """A benchmark without a target figure."""
    return []


@dataclass(frozen=True)
class Benchmark:
    """A benchmark as its driver declares it.

    Attributes
    ----------
    name
        The registry name (``fedtune bench NAME``) and the stem of its result files.
    settings
        ``quick -> settings`` of the quick or the full mode; saved as ``settings`` in the JSON.
    measure
        Runs the arms side by side for ``settings``.
    columns
        The row keys shown in the table, in order.
    plot
        Saves the benchmark's figure(s) (:func:`~.figures.save_figure`).
    targets
        One line per target figure the issue names, met or missed (:func:`target_note`).
    """

    name: str
    settings: Callable[[bool], Settings]
    measure: Callable[[Settings], Outcome]
    columns: tuple[str, ...]
    plot: Callable[[Outcome, Settings], None]
    targets: Callable[[Outcome, Settings], list[str]] = no_targets

    def run(self, quick: bool) -> Path:
        """Measure, plot and write the results of the quick or full mode; return the JSON path."""
        s = self.settings(quick)
        outcome = self.measure(s)
        self.plot(outcome, s)
        return write_results(
            self.name,
            outcome.rows,
            columns=self.columns,
            notes=[*outcome.notes, *self.targets(outcome, s)],
            extra={"settings": s, **outcome.extra},
            quick=quick,
        )


def target_note(
    what: str, value: float | None, limit: float, *, at_most: bool, unit: str = "", digits: int = 2
) -> str:
    """``"what: 1.23x (target <= 1.50x: met)"``; a target this run did not reach says so.

    Parameters
    ----------
    what
        The measured figure, e.g. ``"SecAgg+ round time at 20 sites / plain"``.
    value
        The figure, or ``None`` when this run did not measure it (e.g. a quick mode).
    limit
        The target's bound.
    at_most
        ``True``: met when ``value <= limit``; ``False``: met when ``value >= limit``.
    unit
        Printed after each number (``"x"``, ``" GB"``, ...).
    digits
        Decimals printed.
    """
    sign = "<=" if at_most else ">="
    bound = f"target {sign} {limit:.{digits}f}{unit}"
    if value is None:
        return f"{what}: not measured in this run ({bound})."
    met = value <= limit if at_most else value >= limit
    return f"{what}: {value:.{digits}f}{unit} ({bound}: {'met' if met else 'missed'})."
