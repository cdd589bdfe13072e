"""Live progress of a run (round, stage, sites done, metrics) and the final results table, with rich."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from fedtune.common.records import RoundRecord
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table


def _num(value: float) -> str:
    return f"{value:.4f}"


def _mb(value: float) -> str:
    return f"{value / 1e6:.2f} MB"


def _s(value: float) -> str:
    return f"{value:.1f}"


# round-record field -> (column header, formatter), in display order
COLUMNS: dict[str, tuple[str, Callable[[Any], str]]] = {
    "round": ("round", str),
    "train_loss": ("train loss", _num),
    "accuracy": ("acc", _num),
    "macro_f1": ("macro-F1", _num),
    "auc": ("AUC", _num),
    "exact_match": ("exact", _num),
    "category_match": ("category", _num),
    "valid_code": ("valid code", _num),
    "sites_accuracy": ("sites acc", _num),
    "sites_macro_f1": ("sites F1", _num),
    "sites_category_match": ("sites category", _num),
    "bytes_up": ("up", _mb),
    "bytes_down": ("down", _mb),
    "dp_epsilon": ("ε client", _num),
    "example_dp_epsilon": ("ε patient (max)", _num),
    "seconds": ("s", _s),
}


def _fmt(key: str, value: Any) -> str:
    return "-" if value is None else COLUMNS[key][1](value)


def dropped_sites(records: Sequence[RoundRecord]) -> list[str]:
    """One line per site left out of a round's aggregate: the round, the node and why (a category).

    A fedtune site reports only its error's category; the details are in the site's own log.
    """
    return [
        f"round {r.round}: site node {node} left out: {reason}"
        for r in records
        for node, reason in r.excluded_sites.items()
    ]


def results_table(records: Sequence[RoundRecord], title: str) -> Table:
    """A table with one row per round and the columns of :data:`COLUMNS` that have values."""
    keys = [k for k in COLUMNS if any(getattr(r, k) is not None for r in records)]
    table = Table(title=title)
    for key in keys:
        table.add_column(COLUMNS[key][0], justify="right")
    for record in records:
        table.add_row(*(_fmt(k, getattr(record, k)) for k in keys))
    return table


class RunProgress:
    """A progress bar per stage (sites done / sampled) plus a line per finished round."""

    def __init__(self, num_rounds: int, console: Console | None = None) -> None:
        self.num_rounds = num_rounds
        self.console = console or Console()
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("sites"),
            TimeElapsedColumn(),
            console=self.console,
            transient=True,
        )
        self._task = self._progress.add_task("starting", total=None)

    def __enter__(self) -> RunProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def stage(self, server_round: int, kind: str, done: int, expected: int) -> None:
        """Show ``done`` of ``expected`` site replies for a ``kind`` stage of ``server_round``."""
        kind = "base model" if kind == "query" else kind  # the only query messages: base-model distribution
        label = f"round {server_round}/{self.num_rounds} · {kind}" if server_round else kind
        self._progress.update(self._task, description=label, completed=done, total=expected)

    def round_done(self, record: RoundRecord) -> None:
        """Print one finished round's headline figures."""
        shown = [k for k in COLUMNS if k != "round" and getattr(record, k) is not None]
        parts = [f"{COLUMNS[k][0]} {_fmt(k, getattr(record, k))}" for k in shown]
        self.console.print(f"[green]round {record.round}/{self.num_rounds}[/green]  " + "  ".join(parts))
