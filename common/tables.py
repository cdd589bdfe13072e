"""The one reader of the sites' CSV and JSONL files: rows with their line numbers, errors that name them."""

from __future__ import annotations

import csv
import functools
import json
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
