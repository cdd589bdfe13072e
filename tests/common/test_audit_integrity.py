"""The audit trail is checked record by record: every mismatch named by site, round and line."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from fedtune.common.audit_integrity import Numbered, integrity_check
from fedtune.common.records import RoundRecord

SERVER, SITE, METRICS = Path("audit/server/wire.jsonl"), Path("audit/sites/site-0/wire.jsonl"), Path("m.json")


def _record(direction: str, node: int = 7, rnd: int = 1, sha: str = "aa", stage: str = "") -> dict[str, Any]:
    tensor = {"name": "fitres.parameters.0", "shape": [4, 3], "dtype": "float32", "bytes": 176, "sha256": sha}
    return {
        "direction": direction,
        "error": "",
        "kind": "train",
        "node": node,
        "payload_bytes": 200,
        "round": rnd,
        "stage": stage,
        "tensors": [tensor],
    }


def _trail() -> tuple[list[dict], list[Numbered], list[Numbered]]:
    """Rounds 1-2 of one site (node 7) recorded on both sides, and a node 8 that kept no records."""
    messages = [_record(d, rnd=r) for r in (1, 2) for d in ("down", "up")]
    server = [(SERVER, i + 1, m) for i, m in enumerate([*messages, _record("up", node=8)])]
    site = [(SITE, i + 1, copy.deepcopy(m)) for i, m in enumerate(messages)]
    rounds = [
        RoundRecord(round=0),
        RoundRecord(round=1, bytes_up=400, bytes_down=200),
        RoundRecord(round=2, bytes_up=200, bytes_down=200),
    ]
    return rounds, server, site


def _check(rounds: list[RoundRecord], server: list[Numbered], site: list[Numbered]) -> list[str]:
    return [str(m) for m in integrity_check(METRICS, rounds, server, site)]


def test_a_consistent_trail_has_no_mismatch() -> None:
    # Execute / Assert
    assert _check(*_trail()) == []


def test_an_edited_payload_size_on_the_server_is_named_on_both_sides_and_in_the_totals() -> None:
    # Prepare: the coordinator's record of round 2's upload (line 4) claims more bytes
    rounds, server, site = _trail()
    server[3][2]["payload_bytes"] = 6000

    # Execute
    found = _check(rounds, server, site)

    # Assert
    assert found == [
        f"{SITE}, line 4 (site node 7, round 2): up train message differs from the coordinator's record "
        f"({SERVER}, line 4) in its payload_bytes",
        f"{METRICS}, record 2 (round 2): bytes_up 200, but the coordinator's wire records sum to 6000",
    ]


def test_an_edited_site_hash_is_named_with_its_site_round_stage_and_line() -> None:
    # Prepare
    rounds, server, site = _trail()
    site[1][2]["tensors"][0]["sha256"] = "bb"
    site[1][2]["stage"] = server[1][2]["stage"] = "collect_masked_vectors"

    # Execute
    found = _check(rounds, server, site)

    # Assert
    assert found[0] == (
        f"{SITE}, line 2 (site node 7, round 1, stage collect_masked_vectors): up train message differs from "
        f"the coordinator's record ({SERVER}, line 2) in its tensor SHA-256s"
    )
    assert len(found) == 1  # one mismatch per message, naming both records


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda r: r["tensors"][0].update(bytes=177), "tensor fitres.parameters.0: 177 bytes recorded, but"),
        (lambda r: r["tensors"][0].update(bytes=40), "tensor fitres.parameters.0: 40 bytes recorded, but"),
        (
            lambda r: r["tensors"][0].update(dtype="bytes"),
            "tensor fitres.parameters.0: 176 bytes recorded for a 4-byte string",
        ),
        (lambda r: r.update(payload_bytes=100), "payload_bytes 100 is less than its tensors' 176"),
        (lambda r: r.pop("kind"), "malformed record: no kind"),
    ],
)
def test_a_record_that_contradicts_itself_is_named(edit, expected: str) -> None:
    # Prepare
    rounds, server, site = _trail()
    edit(site[0][2])

    # Execute
    found = _check(rounds, server, site)

    # Assert: the bad record; the coordinator's copy of that message is then unmatched
    assert found[0].startswith(f"{SITE}, line 1 (site node 7, round 1): {expected}")
    assert (
        found[1] == f"{SERVER}, line 1 (site node 7, round 1): down train message the site has no record of"
    )


def test_a_message_the_coordinator_never_recorded_is_named() -> None:
    # Prepare
    rounds, server, site = _trail()
    site.append((SITE, 5, _record("up", rnd=3)))

    # Execute / Assert
    assert _check(rounds, server, site) == [
        f"{SITE}, line 5 (site node 7, round 3): up train message the coordinator has no record of"
    ]
