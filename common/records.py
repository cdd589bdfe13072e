"""One round of a run as the coordinator records it: the one definition of ``metrics.json``'s rows.

The coordinator writes a :class:`RoundRecord` per round (round 0: the initial adapter's score);
the checkpoint keeps them, the console table and the plots show their fields, the benchmarks
and the deployment harness read them back with :func:`read_records`. ``metrics.json`` holds the
list as JSON objects; a field without a value (a round-0 record has no traffic, ``auc`` exists for
two-class tasks, ``dp_epsilon`` under client-level DP, ``example_dp_epsilon`` under patient-level DP)
is left out of the object.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .files import write_json_atomic


@dataclass(frozen=True)
class RoundRecord:
    """The coordinator's record of one round.

    Attributes
    ----------
    round
        The round (0: the initial adapter, before any training).
    loss, accuracy, macro_f1, auc
        The shared adapter after the round on the coordinator's held-out set (``auc``: two classes).
    exact_match, category_match, valid_code
        Generative tasks instead of accuracy and macro-F1: the share of generated answers equal to the
        target, with the same ICD-10 category, and that are valid codes (the last two: code answers).
    sites_loss, sites_accuracy, sites_macro_f1, sites_auc, sites_exact_match, sites_category_match
        The sites' own evaluation of it on their local splits, weighted by examples (when asked).
    train_loss
        The sites' mean training loss in the round.
    site_train_examples
        The example count of each site in the aggregate, sorted (no node ids).
    site_examples_per_second
        The sites' mean training speed.
    excluded_sites
        Site node -> the category of its error, for each site left out of the aggregate.
    bytes_up, bytes_down
        Payload bytes of the round's messages, all sites together.
    bytes_up_per_site, bytes_down_per_site
        The same per site node.
    seconds
        Wall time of the round at the coordinator.
    dp_epsilon
        Client-level DP: the accountant's epsilon after the round.
    example_dp_epsilon
        Patient-level DP: the largest epsilon of the sites that trained this round.
    sites_example_dp
        Patient-level DP: per site label (partition in simulation, node in deployment), its epsilon
        after the round, sigma, DP-SGD steps charged so far and sampling rate q.
    """

    round: int
    loss: float | None = None
    accuracy: float | None = None
    macro_f1: float | None = None
    auc: float | None = None
    exact_match: float | None = None
    category_match: float | None = None
    valid_code: float | None = None
    sites_loss: float | None = None
    sites_accuracy: float | None = None
    sites_macro_f1: float | None = None
    sites_auc: float | None = None
    sites_exact_match: float | None = None
    sites_category_match: float | None = None
    train_loss: float | None = None
    site_train_examples: list[int] | None = None
    site_examples_per_second: float | None = None
    excluded_sites: dict[str, str] = field(default_factory=dict)
    bytes_up: int | None = None
    bytes_down: int | None = None
    bytes_up_per_site: dict[str, int] | None = None
    bytes_down_per_site: dict[str, int] | None = None
    seconds: float = 0.0
    dp_epsilon: float | None = None
    example_dp_epsilon: float | None = None
    sites_example_dp: dict[str, dict[str, float]] | None = None

    def to_json(self) -> dict[str, Any]:
        """The JSON object of ``metrics.json`` (fields without a value left out)."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any], where: str = "the record") -> RoundRecord:
        """Read one object of ``metrics.json``.

        Raises
        ------
        ValueError
            ``obj`` is not an object, lacks ``round`` or holds a field no record has (names it and ``where``).
        """
        if not isinstance(obj, Mapping) or "round" not in obj:
            raise ValueError(f"{where} is not a round record (a JSON object with a `round`).")
        unknown = sorted(set(obj) - FIELDS)
        if unknown:
            raise ValueError(
                f"{where} has field(s) {', '.join(unknown)} that no round record has: it was written by "
                f"another fedtune version or edited by hand. Known fields: {', '.join(sorted(FIELDS))}."
            )
        return cls(**obj)


FIELDS = frozenset(f.name for f in fields(RoundRecord))
# the scores of the shared adapter on a held-out set, as evaluation's metric dicts name them
SCORES: tuple[str, ...] = (
    *("loss", "accuracy", "macro_f1", "auc"),  # classification
    *("exact_match", "category_match", "valid_code"),  # generation
)
# those the sites' own evaluation reports in a record (``sites_<name>``)
SITE_SCORES: tuple[str, ...] = tuple(k for k in SCORES if f"sites_{k}" in FIELDS)


def write_records(path: Path, records: Sequence[RoundRecord]) -> None:
    """Write ``metrics.json`` (atomically)."""
    write_json_atomic(path, [r.to_json() for r in records])


def records_from_json(rows: Any, where: str) -> list[RoundRecord]:
    """Records from the parsed JSON list of ``metrics.json`` or a checkpoint (``where`` names it)."""
    if not isinstance(rows, list):
        raise ValueError(f"{where} holds no list of round records.")
    return [RoundRecord.from_json(row, f"{where}, record {i}") for i, row in enumerate(rows)]


def read_records(path: Path) -> list[RoundRecord]:
    """Read ``metrics.json``.

    Raises
    ------
    ValueError
        The file is cut short or not a list of round records (names the file and the record).
    FileNotFoundError
        No such file.
    """
    try:
        rows = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{path} is not valid JSON (line {err.lineno}, column {err.colno}): it was cut short or edited. "
            "A resumable run rewrites it from its checkpoint with `--resume`."
        ) from None
    return records_from_json(rows, str(path))
