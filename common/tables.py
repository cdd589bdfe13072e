"""The one reader of the sites' CSV and JSONL files: rows with their line numbers, errors that name them.

Also the rules a label column must meet when its classes are inferred from the file
(:func:`check_label_values`), shared by the sites (:mod:`fedtune.common.data`) and deploy-local's
check of the site files (:func:`file_labels`).
"""

from __future__ import annotations

import csv
import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple


class DataError(ValueError):
    """Bad input data; the message names the file, line and column and the fix."""


class Table(NamedTuple):
    """A parsed file: column names, where they were read, and ``(line, cells aligned to columns)`` per row."""

    columns: tuple[str, ...]
    columns_from: str
    rows: tuple[tuple[int, tuple[str, ...]], ...]


@functools.lru_cache(maxsize=4)
def read_table_cached(path: str) -> Table:
    """:func:`read_table` for a packaged file that does not change."""
    return read_table(Path(path))


def read_table(path: Path) -> Table:
    """Parse a ``.csv`` or ``.jsonl``/``.json`` file."""
    if not path.is_file():
        raise DataError(f"{path}: file not found; set `data-path` to an existing .csv or .jsonl file.")
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl", ".json"):
        raise DataError(
            f"{path}: unsupported file type `{suffix}`; use .csv (with a header row) or .jsonl/.json "
            "(one JSON object per line)."
        )
    try:
        return _read_csv(path) if suffix == ".csv" else _read_jsonl(path)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc}); save the file as UTF-8.") from None


def _read_csv(path: Path) -> Table:
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        try:
            header = next(reader, None)
            if header is None:
                raise DataError(f"{path}, line 1: file is empty; it needs a header row naming the columns.")
            columns = tuple(name.strip() for name in header)
            for i, name in enumerate(columns):
                if name in columns[:i]:
                    raise DataError(
                        f"{path}, line 1, column `{name}`: duplicate column name; rename one of them."
                    )
            rows = []
            start = reader.line_num + 1
            for cells in reader:
                line, start = start, reader.line_num + 1
                if not cells:  # blank line
                    continue
                if len(cells) < len(columns):
                    raise DataError(
                        f"{path}, line {line}, column `{columns[len(cells)]}`: row has {len(cells)} fields "
                        f"but the header has {len(columns)}; fill the missing cells (quote cells containing "
                        "commas)."
                    )
                if len(cells) > len(columns):
                    raise DataError(
                        f"{path}, line {line}: row has {len(cells)} fields but the header has {len(columns)} "
                        f"(last column `{columns[-1]}`); quote cells containing commas or add the column."
                    )
                rows.append((line, tuple(cells)))
        except csv.Error as exc:
            raise DataError(
                f"{path}, line {reader.line_num}: unparsable CSV ({exc}); fix the quoting."
            ) from None
    if not rows:
        raise DataError(f"{path}, line 1: only a header row, no data rows; add rows below the header.")
    return Table(columns, "line 1 (header)", tuple(rows))


def _read_jsonl(path: Path) -> Table:
    """Columns are the keys in order of first appearance; a key missing from an object is an empty cell."""
    records: list[tuple[int, dict[str, object]]] = []
    keys: dict[str, None] = {}
    with path.open(encoding="utf-8-sig") as f:
        for line, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{path}, line {line}, column {exc.colno}: invalid JSON ({exc.msg}); write one JSON "
                    "object per line."
                ) from None
            if not isinstance(obj, dict):
                raise DataError(
                    f'{path}, line {line}: expected a JSON object like {{"text": ..., "label": ...}}, got a '
                    f"{type(obj).__name__}; write one object per line."
                )
            keys.update(dict.fromkeys(obj))
            records.append((line, obj))
    if not records:
        raise DataError(f"{path}, line 1: file is empty; write one JSON object per line.")
    columns = tuple(keys)
    rows = tuple((line, tuple(_cell(obj.get(c)) for c in columns)) for line, obj in records)
    return Table(columns, f"lines {records[0][0]}-{records[-1][0]} (keys of every object)", rows)


def _cell(value: object) -> str:
    """Render a JSON value as cell text (``null`` = empty, strings as is, anything else as JSON)."""
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value)


# A label column read without `labels` is refused as free text (notes, names, record numbers would
# otherwise become class names, written into the shared adapter's fedtune.json) above these:
MAX_INFERRED_CLASSES = 100
MAX_LABEL_CHARS = 64


def check_label_values(source: str, column: str, labels: Sequence[str]) -> None:
    """Refuse inferred label values that look like free text rather than classes.

    More than :data:`MAX_INFERRED_CLASSES` distinct values, or one longer than
    :data:`MAX_LABEL_CHARS` characters, is most likely a text column read as the label (the message
    names no value: they may be patient text).

    Raises
    ------
    DataError
        Naming the file and column, the count and the longest length, and the fix.
    """
    longest = max((len(x) for x in labels), default=0)
    if len(labels) > MAX_INFERRED_CLASSES or longest > MAX_LABEL_CHARS:
        raise DataError(
            f"{source}, column `{column}`: {len(labels)} distinct labels, the longest {longest} characters "
            f"(limits without `labels`: {MAX_INFERRED_CLASSES} classes, {MAX_LABEL_CHARS} characters); this "
            "looks like free text, not a class label. Check `label-column` and `text-column`; if these are "
            "the classes, list them in `labels`."
        )


def file_labels(path: Path, label_column: str) -> tuple[int, tuple[str, ...]]:
    """``(data rows, sorted distinct non-empty labels)`` of a CSV/JSONL file, read by the site's rules.

    Raises
    ------
    DataError
        The file is missing, unparsable or has no ``label_column`` (names file, line and column).
    """
    table = read_table(path)
    li = require_column(str(path), table, label_column, "label")
    labels = {cells[li].strip() for _, cells in table.rows} - {""}
    return len(table.rows), tuple(sorted(labels))


def require_column(source: str, table: Table, column: str, role: str) -> int:
    """Index of ``column`` in ``table``; a missing one is a :class:`DataError` naming those present."""
    if column not in table.columns:
        raise DataError(
            f"{source}, {table.columns_from}: no {role} column `{column}`; columns present: "
            f"{', '.join(table.columns)}. "
            f"Set `{role}-column` to one of them."
        )
    return table.columns.index(column)
