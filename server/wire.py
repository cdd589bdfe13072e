"""A Grid wrapper that meters (and, for the audit, records) every message and reports progress.

It counts the payload bytes of each message's content (array bytes, bytes/str values of
config records, 8 bytes per numeric scalar) per round, node and direction, as the
messages really are: under SecAgg+ that is the masked (uint32) vectors and the key
exchange, not the fp32 adapter. ``send_and_receive`` is Flower's push-then-pull loop,
with a callback after each reply so a live display can show sites done. Error replies are kept
per round and node (:meth:`MeteredGrid.failed_replies`), so a site that dropped out is named
with its reason. A SecAgg+ masked vector, metered as it crossed the wire (narrow, see
:mod:`fedtune.common.secagg_wire`), is widened back to int64 before Flower's workflow sums it.
"""

from __future__ import annotations

import re
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import cast

from fedtune.common.audit import (
    WireLog,
    content_arrays,
    message_record,
    message_round,
    payload_bytes,
    save_arrays,
    secagg_stage,
)
from fedtune.common.run_folder import WIRE_LOG, received_round_name
from fedtune.common.secagg_wire import widen
from fedtune.common.site_errors import parse_reason
from flwr.app import Message
from flwr.app.message_type import MessageType
from flwr.common import bytes_to_ndarray, ndarray_to_bytes
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.serverapp import Grid

# (round, message_type, replies_received, replies_expected)
ProgressFn = Callable[[int, str, int, int], None]


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
ERROR_CHARS = 400


def error_summary(reason: str) -> str:
    """An error reply's reason on one line, without colour codes; a long one (a traceback) keeps its end.

    A fedtune site sends only its error's category (:mod:`fedtune.common.site_errors`), which is kept
    alone; another reason (Flower's own) is kept as sent, its end when long.
    """
    text = " ".join(_ANSI.sub("", reason).split())
    site = parse_reason(text)
    if site is not None:
        return site
    return text if len(text) <= ERROR_CHARS else "..." + text[-ERROR_CHARS:]


def widen_masked_reply(msg: Message) -> None:
    """Restore a SecAgg+ reply's masked vector (if it has one) to the int64 Flower's workflow sums."""
    if not msg.has_content() or RECORD_KEY_CONFIGS not in msg.content.config_records:
        return
    replies = msg.content.config_records[RECORD_KEY_CONFIGS]
    if Key.MASKED_PARAMETERS in replies:
        masked = [bytes_to_ndarray(b) for b in cast(list[bytes], replies[Key.MASKED_PARAMETERS])]
        replies[Key.MASKED_PARAMETERS] = [ndarray_to_bytes(widen(a)) for a in masked]


class MeteredGrid(Grid):
    """Delegates to a real ``Grid``; meters bytes and reports reply progress.

    ``audit_dir`` (the run's ``audit/server``) receives the wire log and every received update.
    """

    def __init__(
        self, grid: Grid, on_progress: ProgressFn | None = None, audit_dir: Path | None = None
    ) -> None:
        self._grid = grid
        self._on_progress = on_progress
        self._audit_dir = audit_dir
        self._wire_log = WireLog(audit_dir / WIRE_LOG) if audit_dir else None
        self._stages: dict[str, str] = {}  # message id -> SecAgg+ stage, so a reply is filed under its stage
        # message id -> destination node: a reply is filed under the node asked, even an error reply the
        # SuperLink writes on behalf of a node that went offline
        self._sent: dict[str, int] = {}
        self._label = ""  # the exchange under way, when not the round's training (see labelled)
        self.errors: dict[int, dict[int, str]] = defaultdict(dict)  # round -> node id -> error reason
        # round -> direction ("down"/"up") -> node id -> bytes
        self.bytes: dict[int, dict[str, dict[int, int]]] = defaultdict(
            lambda: defaultdict(lambda: defaultdict(int))
        )

    # --- metering ---------------------------------------------------------------------------
    def _meter(self, msgs: Iterable[Message], direction: str) -> None:
        for m in msgs:
            if direction == "down":
                node = m.metadata.dst_node_id
            else:
                node = self._sent.pop(m.metadata.reply_to_message_id, m.metadata.src_node_id)
                if m.has_error():
                    self.errors[message_round(m)][node] = error_summary(m.error.reason)
            size = payload_bytes(m)
            self.bytes[message_round(m)][direction][node] += size
            if self._wire_log is not None:
                self._record(m, node, direction, size)

    def _record(self, msg: Message, node: int, direction: str, size: int) -> None:
        """Append the message's audit record; keep the arrays a site uploaded in a train reply."""
        has = msg.has_content()
        # a reply is filed under the stage of the request it answers
        reply_to = msg.metadata.reply_to_message_id
        stage = self._stages.pop(reply_to, "") if direction == "up" else secagg_stage(msg)
        self._wire_log.append(
            message_record(msg, node=node, direction=direction, stage=stage, payload_bytes=size)
        )
        if direction == "up" and has and msg.metadata.message_type == MessageType.TRAIN:
            arrays = content_arrays(msg.content)
            if arrays:
                name = received_round_name(message_round(msg), node, self._label)
                save_arrays(self._audit_dir / name, arrays)

    @contextmanager
    def labelled(self, label: str) -> Iterator[None]:
        """Within the block, the arrays sites upload are filed as ``received-LABEL-round-...``."""
        self._label = label
        try:
            yield
        finally:
            self._label = ""

    def failed_replies(self, server_round: int) -> dict[int, str]:
        """``{node: error reason}`` of the error replies received in one round."""
        return dict(self.errors.get(server_round, {}))

    def round_bytes(self, server_round: int) -> dict[str, dict[int, int]]:
        """``{"down": {node: bytes}, "up": {node: bytes}}`` for one round."""
        return {d: dict(self.bytes[server_round][d]) for d in ("down", "up")}

    # --- Grid API -----------------------------------------------------------------------------
    def set_run(self, run_id):  # noqa: ANN001, ANN201, D102
        return self._grid.set_run(run_id)

    @property
    def run(self):  # noqa: ANN201, D102
        return self._grid.run

    def create_message(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201, D102
        return self._grid.create_message(*args, **kwargs)

    def get_node_ids(self):  # noqa: ANN201, D102
        return self._grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # noqa: D102
        messages = list(messages)
        self._meter(messages, "down")
        ids = list(self._grid.push_messages(messages))
        self._sent.update((i, m.metadata.dst_node_id) for i, m in zip(ids, messages, strict=True) if i)
        if self._wire_log is not None:
            self._stages.update((i, secagg_stage(m)) for i, m in zip(ids, messages, strict=True) if i)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # noqa: D102
        replies = list(self._grid.pull_messages(message_ids))
        self._meter(replies, "up")
        for reply in replies:
            widen_masked_reply(reply)
        return replies

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push ``messages`` and pull replies until all arrived or ``timeout`` passed."""
        return [reply for _, reply in self.exchange(messages, timeout=timeout)]

    def replies_by_node(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> dict[int, Message]:
        """Like :meth:`send_and_receive` (one message per node): ``{node asked: its reply}``.

        A reply the SuperLink writes for a node that went offline is filed under that node.
        """
        return dict(self.exchange(messages, timeout=timeout))

    def exchange(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[tuple[int, Message]]:
        """Push ``messages`` and pull replies until all arrived or ``timeout`` passed: ``(node, reply)``."""
        messages = list(messages)
        kind, server_round = (
            (messages[0].metadata.message_type, message_round(messages[0])) if messages else ("", 0)
        )
        ids = self.push_messages(messages)
        pending = {i: m.metadata.dst_node_id for i, m in zip(ids, messages, strict=True) if i}
        expected, replies = len(pending), []
        if self._on_progress:
            self._on_progress(server_round, kind, 0, expected)
        end_time = time.time() + (timeout or 0.0)
        while pending and (timeout is None or time.time() < end_time):
            got = list(self.pull_messages(pending))
            replies.extend((pending.pop(m.metadata.reply_to_message_id), m) for m in got)
            if got and self._on_progress:
                self._on_progress(server_round, kind, len(replies), expected)
            if pending:
                time.sleep(0.1)
        return replies
