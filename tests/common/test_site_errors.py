"""A site's error crosses to the coordinator as a category; its details stay in the site's log."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from fedtune.client.app import make_client_app
from fedtune.client.errors import make_site_errors_mod
from fedtune.common.base_files import FingerprintMismatchError
from fedtune.common.config import ConfigError
from fedtune.common.data import DataError
from fedtune.common.preflight import PreflightError
from fedtune.common.records import RoundRecord
from fedtune.common.site_errors import SiteError, category_of, parse_reason
from fedtune.server.progress import dropped_sites
from fedtune.server.wire import error_summary
from fedtune.simulations import cli
from flwr.app import Context, Message, RecordDict
from flwr.app.message_type import MessageType

SECRET = "/hospital/private/notes.csv, line 7, column `label`: label 'Jane Roe, MRN 123456'"


@pytest.mark.parametrize(
    ("err", "category"),
    [
        (DataError(SECRET), "data"),
        (PreflightError(SECRET), "data"),
        (UnicodeDecodeError("utf-8", b"\xff", 0, 1, SECRET), "data"),
        (FingerprintMismatchError(SECRET), "base-model"),
        (FileNotFoundError(SECRET), "base-model"),
        (ConfigError(SECRET), "config"),
        (MemoryError(SECRET), "memory"),
        (type("OutOfMemoryError", (RuntimeError,), {})(SECRET), "memory"),
        (KeyError(SECRET), "internal"),
    ],
)
def test_every_error_maps_to_a_category_whose_message_holds_none_of_it(err: Exception, category: str) -> None:
    # Execute
    got = category_of(err)
    text = str(SiteError(got))

    # Assert
    assert got == category
    assert text.startswith(f"site error [{category}]: ") and "hospital" not in text and "Jane" not in text


def _message() -> tuple[Message, Context]:
    msg = Message(RecordDict(), dst_node_id=7, message_type=MessageType.TRAIN, group_id="3")
    ctxt = Context(run_id=1, node_id=7, node_config={"partition-id": 2}, state=RecordDict(), run_config={})
    return msg, ctxt


@pytest.mark.usefixtures("task_identity")
def test_the_mod_logs_the_details_at_the_site_and_raises_only_the_category(tmp_path: Path, caplog) -> None:
    # Prepare
    mod = make_site_errors_mod(tmp_path / "site-logs")
    msg, ctxt = _message()

    def call_next(m: Message, c: Context) -> Message:
        raise DataError(SECRET)

    # Execute
    with caplog.at_level(logging.ERROR, logger="fedtune.site"), pytest.raises(SiteError) as info:
        mod(msg, ctxt, call_next)

    # Assert: what Flower sends back holds no detail; the site's own log and file hold all of it
    assert "Jane" not in str(info.value) and "hospital" not in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert SECRET in caplog.text and "round 3 train" in caplog.text
    line = (tmp_path / "site-logs" / "site-2.log").read_text()
    assert line == f"[data] round 3 train: DataError: {SECRET}\n"


@pytest.mark.usefixtures("task_identity")
def test_a_reply_passes_through_and_the_mod_is_outermost() -> None:
    # Prepare
    mod = make_site_errors_mod(None)
    msg, ctxt = _message()

    # Execute / Assert
    assert mod(msg, ctxt, lambda m, c: m) is msg
    assert make_client_app()._mods[0].__name__ == "site_errors_mod"


@pytest.mark.parametrize(
    "reason",
    [  # deployment (flwr-clientapp) and simulation (Ray actor) wrap the exception differently
        "<class 'fedtune.common.site_errors.SiteError'>:<'{}'>",
        "<class 'flwr.clientapp.client_app.ClientAppException'>:<'\nException ClientAppException occurred. "
        "Message: {}'>",
    ],
)
def test_the_coordinator_keeps_the_category_alone(reason: str) -> None:
    # Prepare
    text = reason.format(SiteError("data"))

    # Execute / Assert
    expected = "site error [data]: its data failed validation"
    assert parse_reason(text) == expected and error_summary(text) == expected
    assert parse_reason("<class 'ValueError'>:<'boom'>") is None
    assert error_summary("<class 'ValueError'>:<'boom'>") == "<class 'ValueError'>:<'boom'>"


def test_a_run_that_lost_sites_lists_them_and_exits_3(tmp_path: Path, monkeypatch, capsys) -> None:
    from fedtune.simulations import simulate

    # Prepare: round 2 left site node 11 out
    records = [
        RoundRecord(round=0),
        RoundRecord(round=1),
        RoundRecord(
            round=2, excluded_sites={"11": "dropped out: site error [data]: its data failed validation"}
        ),
    ]
    monkeypatch.setattr(simulate, "simulate", lambda *a, **k: records)

    # Execute
    rc = cli.main(["simulate", "--out", str(tmp_path / "run"), "--num-clients", "2"])

    # Assert
    err = capsys.readouterr().err
    assert rc == cli.EXIT_SITES_LOST == 3
    assert "round 2: site node 11 left out: dropped out: site error [data]" in err
    assert f"{tmp_path / 'run'}/site-logs/" in err
    assert dropped_sites(records[:2]) == []
    monkeypatch.setattr(simulate, "simulate", lambda *a, **k: records[:2])
    assert cli.main(["simulate", "--out", str(tmp_path / "run2"), "--num-clients", "2"]) == 0
