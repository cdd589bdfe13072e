"""Is the audit trail consistent? Every record checked, every mismatch named by site, round and line.

Three independent accounts of what crossed the wire must agree:

- each **record** with itself: every tensor's byte count fits its shape and dtype, and
  the message's ``payload_bytes`` holds at least its tensors;
- each **site's record** of a message with the **coordinator's record** of the same message (same
  node, round, stage, direction and kind): the same ``payload_bytes`` and the same tensor SHA-256s;
  a message one side recorded and the other did not is a mismatch too (for sites that kept records);
- ``metrics.json``'s per-round ``bytes_up`` / ``bytes_down`` with the sums of the coordinator's records.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .records import RoundRecord

Numbered = tuple[Path, int, dict[str, Any]]  # (file, line, record)
NPY_ALIGN, NPY_HEADER_MAX = 64, 4096  # an .npy header's padding and a generous bound on its size
FIELDS = ("direction", "kind", "node", "payload_bytes", "round", "stage", "tensors")


@dataclass(frozen=True)
class Mismatch:
    """One inconsistency: where (file, line or record, site node, round, stage) and what differs.

    ``node`` is empty for a whole round's figure.
    """

    file: str
    location: str
    node: str
    round: int
    stage: str
    problem: str

    def __str__(self) -> str:
        where = [f"site node {self.node}"] if self.node else []
        where += [f"round {self.round}"] + ([f"stage {self.stage}"] if self.stage else [])
        return f"{self.file}, {self.location} ({', '.join(where)}): {self.problem}"


def _mismatch(file: Path, line: int, record: dict[str, Any], problem: str) -> Mismatch:
    node, stage = str(record.get("node", "?")), str(record.get("stage", ""))
    return Mismatch(str(file), f"line {line}", node, int(record.get("round", -1)), stage, problem)


def record_problems(file: Path, line: int, record: dict[str, Any]) -> list[Mismatch]:
    """What is wrong with one record on its own (missing fields, byte counts that do not add up)."""
    missing = [f for f in FIELDS if f not in record]
    if missing:
        return [_mismatch(file, line, record, f"malformed record: no {', '.join(missing)}")]
    problems = []
    total = 0
    for t in record["tensors"]:
        problem = _tensor_problem(t)
        if problem:
            problems.append(_mismatch(file, line, record, f"tensor {t.get('name')}: {problem}"))
        total += int(t.get("bytes") or 0)
    if record["payload_bytes"] < total:
        problem = f"payload_bytes {record['payload_bytes']} is less than its tensors' {total}"
        problems.append(_mismatch(file, line, record, problem))
    return problems


def _tensor_problem(t: dict[str, Any]) -> str:
    """Whether a tensor's recorded bytes fit its shape and dtype ("" when they do).

    A byte string's size is its length; an array travels as an ``.npy`` file (Flower's ``Array``):
    its data plus a header padded to a multiple of :data:`NPY_ALIGN` bytes, at most :data:`NPY_HEADER_MAX`.
    """
    try:
        recorded = int(t["bytes"])
        if t["dtype"] == "bytes":
            expected = int(t["shape"][0])
            return "" if recorded == expected else f"{recorded} bytes recorded for a {expected}-byte string"
        data = int(np.prod(t["shape"], dtype=np.int64)) * np.dtype(t["dtype"]).itemsize
    except (KeyError, TypeError, ValueError, IndexError):
        return "malformed tensor entry (bytes, shape or dtype)"
    header = recorded - data
    if 0 <= header <= NPY_HEADER_MAX and header % NPY_ALIGN == 0:
        return ""
    return (
        f"{recorded} bytes recorded, but its shape {t['shape']} and dtype {t['dtype']} make {data} bytes of "
        f"data plus an .npy header (a multiple of {NPY_ALIGN}, at most {NPY_HEADER_MAX})"
    )


def _key(record: dict[str, Any]) -> tuple[str, int, str, str, str]:
    return (str(record["node"]), record["round"], record["stage"], record["direction"], record["kind"])


def _value(record: dict[str, Any]) -> tuple[int, tuple[str, ...]]:
    return record["payload_bytes"], tuple(sorted(t.get("sha256", "") for t in record["tensors"]))


def cross_check(server: Sequence[Numbered], sites: Sequence[Numbered]) -> list[Mismatch]:
    """Every site record against the coordinator's record of the same message, and the reverse."""
    valid_server = [(f, n, r) for f, n, r in server if not record_problems(f, n, r)]
    valid_sites = [(f, n, r) for f, n, r in sites if not record_problems(f, n, r)]
    recorded = {str(r["node"]) for _, _, r in valid_sites}
    unmatched: dict[tuple, list[Numbered]] = defaultdict(list)
    for item in valid_server:
        if str(item[2]["node"]) in recorded:
            unmatched[_key(item[2])].append(item)
    problems = []
    for file, line, record in valid_sites:
        candidates = unmatched[_key(record)]
        same = next((c for c in candidates if _value(c[2]) == _value(record)), None)
        if same is not None:
            candidates.remove(same)
            continue
        if candidates:
            f, n, r = candidates.pop(0)
            differs = "payload_bytes" if r["payload_bytes"] != record["payload_bytes"] else "tensor SHA-256s"
            problem = (
                f"{record['direction']} {record['kind']} message differs from the coordinator's record "
                f"({f}, line {n}) in its {differs}"
            )
        else:
            problem = f"{record['direction']} {record['kind']} message the coordinator has no record of"
        problems.append(_mismatch(file, line, record, problem))
    for items in unmatched.values():
        for file, line, record in items:
            problem = f"{record['direction']} {record['kind']} message the site has no record of"
            problems.append(_mismatch(file, line, record, problem))
    return problems


def check_totals(
    metrics_file: Path, rounds: Sequence[RoundRecord], server: Sequence[Numbered]
) -> list[Mismatch]:
    """``metrics.json``'s bytes per round and direction against the sums of the coordinator's records."""
    sums: dict[tuple[int, str], int] = defaultdict(int)
    for _, _, r in server:
        if "round" in r and "direction" in r:
            sums[r["round"], r["direction"]] += int(r.get("payload_bytes") or 0)
    problems = []
    for i, rec in enumerate(rounds):
        for direction in ("up", "down"):
            key = f"bytes_{direction}"
            value, total = getattr(rec, key), sums[rec.round, direction]
            if value is not None and value != total:
                problem = f"{key} {value}, but the coordinator's wire records sum to {total}"
                problems.append(Mismatch(str(metrics_file), f"record {i}", "", rec.round, "", problem))
    return problems


def integrity_check(
    metrics_file: Path,
    rounds: Sequence[RoundRecord],
    server: Sequence[Numbered],
    sites: Sequence[Numbered],
) -> list[Mismatch]:
    """Every mismatch of the run's audit trail (see the module docstring), in file order."""
    own = [m for f, n, r in (*server, *sites) for m in record_problems(f, n, r)]
    return own + cross_check(server, sites) + check_totals(metrics_file, rounds, server)
