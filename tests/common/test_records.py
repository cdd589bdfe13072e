"""metrics.json: one RoundRecord definition, written atomically, read back strictly."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from fedtune.common.files import write_json_atomic
from fedtune.common.records import FIELDS, RoundRecord, read_records, write_records


def test_json_is_replaced_atomically(tmp_path: Path, round_records: list[RoundRecord]) -> None:
    # Prepare
    path = tmp_path / "metrics.json"
    write_json_atomic(path, [1])

    # Execute
    write_records(path, round_records)

    # Assert: the records come back as written; fields without a value are left out of the file
    assert read_records(path) == round_records
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
