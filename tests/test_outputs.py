"""What a person reads: the live round lines, the results table, the plots, atomic JSON."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
from fedtune.common.files import write_json_atomic
from fedtune.common.plots import plot_records
from fedtune.common.records import FIELDS, RoundRecord, read_records, write_records
from fedtune.server.progress import RunProgress, results_table
from rich.console import Console

RECORDS = [
    RoundRecord(round=0, accuracy=0.1, macro_f1=0.05, loss=3.0),
    RoundRecord(
        round=1,
        accuracy=0.6,
        macro_f1=0.3,
        loss=1.2,
        train_loss=1.5,
        sites_accuracy=0.55,
        bytes_up=2_500_000,
        bytes_down=3_000_000,
        seconds=12.34,
    ),
]


def _console() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, width=200, force_terminal=False), buf


def test_round_line_and_table_show_the_figures_of_each_round() -> None:
    # Prepare
    console, buf = _console()

    # Execute
    RunProgress(3, console).round_done(RECORDS[1])
    console.print(results_table(RECORDS, "run"))
    text = buf.getvalue()

    # Assert
    assert "round 1/3" in text and "acc 0.6000" in text and "up 2.50 MB" in text and "s 12.3" in text
    assert "0.3000" in text and "3.00 MB" in text and "auc" not in text.lower()  # no AUC column without AUC


def test_plots_are_written_for_the_series_present(tmp_path: Path) -> None:
    # Execute
    written = plot_records(RECORDS, tmp_path)

    # Assert
    assert {p.name for p in written} == {"quality.png", "loss.png", "bytes.png"}
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5_000 for p in written)


def test_plots_have_whole_rounds_megabytes_from_zero_and_the_legend_below(
    tmp_path: Path, monkeypatch
) -> None:
    import matplotlib.pyplot as plt
    from fedtune.common import plots

    # Prepare: keep the figures open to inspect them
    monkeypatch.setattr(plots.plt, "close", lambda fig: None)
    plt.close("all")

    # Execute
    plot_records(RECORDS, tmp_path)
    axes = {fig.axes[0].get_title(): fig.axes[0] for fig in map(plt.figure, plt.get_fignums())}

    # Assert
    bytes_ax = axes["Bytes on the wire per round (all sites)"]
    assert bytes_ax.get_ylabel() == "MB" and bytes_ax.get_ylim()[0] == 0
    up = next(line for line in bytes_ax.get_lines() if line.get_label() == "sites -> server")
    assert list(up.get_ydata()) == pytest.approx(
        [r.bytes_up / 1e6 for r in RECORDS if r.bytes_up is not None]
    )
    assert not bytes_ax.yaxis.get_major_formatter().get_useOffset()
    for ax in axes.values():
        assert all(float(t).is_integer() for t in ax.get_xticks())
        anchor = ax.get_legend().get_bbox_to_anchor().transformed(ax.transAxes.inverted())
        assert anchor.y1 < 0  # below the axes, clear of the data
    plt.close("all")


def test_json_is_replaced_atomically(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "metrics.json"
    write_json_atomic(path, [1])

    # Execute
    write_records(path, RECORDS)

    # Assert: the records come back as written; fields without a value are left out of the file
    assert read_records(path) == RECORDS
    assert json.loads(path.read_text())[0] == {
        "round": 0,
        "accuracy": 0.1,
        "macro_f1": 0.05,
        "loss": 3.0,
        "excluded_sites": {},
        "seconds": 0.0,
    }
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_a_failed_write_leaves_the_previous_file_and_no_temp_file(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "metrics.json"
    write_json_atomic(path, [1])

    # Execute: the value cannot be written as JSON
    with pytest.raises(TypeError):
        write_json_atomic(path, [object()])

    # Assert
    assert json.loads(path.read_text()) == [1]
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('[{"round": 0, "acc": 0.5}]', "record 0 has field(s) acc that no round record has"),
        ('[{"accuracy": 0.5}]', "record 0 is not a round record"),
        ('{"round": 0}', "holds no list of round records"),
        ('[{"round": 0, "accur', "is not valid JSON (line 1, column 15)"),
    ],
)
def test_a_damaged_metrics_file_is_refused_naming_the_file_and_the_record(
    tmp_path: Path, content: str, message: str
) -> None:
    # Prepare
    path = tmp_path / "metrics.json"
    path.write_text(content)

    # Execute / Assert
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        read_records(path)
    assert str(path) in str(err.value)


def test_the_console_columns_and_the_plot_series_are_round_record_fields() -> None:
    from fedtune.common.plots import PANELS
    from fedtune.server.progress import COLUMNS

    # Assert: a renamed field would otherwise leave a column or a curve silently empty
    assert set(COLUMNS) <= FIELDS
    assert {key for panel in PANELS.values() for key, _ in panel.series} <= FIELDS
