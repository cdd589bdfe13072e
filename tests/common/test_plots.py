"""The run's PNG plots: one per panel with the series present, whole rounds, MB from zero."""

from __future__ import annotations

from pathlib import Path

import pytest
from fedtune.common.plots import plot_records
from fedtune.common.records import RoundRecord


def test_plots_are_written_for_the_series_present(tmp_path: Path, round_records: list[RoundRecord]) -> None:
    # Execute
    written = plot_records(round_records, tmp_path)

    # Assert
    assert {p.name for p in written} == {"quality.png", "loss.png", "bytes.png"}
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5_000 for p in written)


def test_plots_have_whole_rounds_megabytes_from_zero_and_the_legend_below(
    tmp_path: Path, monkeypatch, round_records: list[RoundRecord]
) -> None:
    import matplotlib.pyplot as plt
    from fedtune.common import plots

    # Prepare: keep the figures open to inspect them
    monkeypatch.setattr(plots.plt, "close", lambda fig: None)
    plt.close("all")

    # Execute
    plot_records(round_records, tmp_path)
    axes = {fig.axes[0].get_title(): fig.axes[0] for fig in map(plt.figure, plt.get_fignums())}

    # Assert
    bytes_ax = axes["Bytes on the wire per round (all sites)"]
    assert bytes_ax.get_ylabel() == "MB" and bytes_ax.get_ylim()[0] == 0
    up = next(line for line in bytes_ax.get_lines() if line.get_label() == "sites -> server")
    assert list(up.get_ydata()) == pytest.approx(
        [r.bytes_up / 1e6 for r in round_records if r.bytes_up is not None]
    )
    assert not bytes_ax.yaxis.get_major_formatter().get_useOffset()
    for ax in axes.values():
        assert all(float(t).is_integer() for t in ax.get_xticks())
        anchor = ax.get_legend().get_bbox_to_anchor().transformed(ax.transAxes.inverted())
        assert anchor.y1 < 0  # below the axes, clear of the data
    plt.close("all")
