"""A Grid wrapper that meters (and, for the audit, records) every message and reports progress.

It counts the payload bytes of each message's content (array bytes, bytes/str values of
config records, 8 bytes per numeric scalar) per round, node and direction, as the
messages really are: under SecAgg+ that is the masked int64 vectors and the key
exchange, not the fp32 adapter. ``send_and_receive`` is Flower's push-then-pull loop,
with a callback after each reply so a live display can show sites done.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path

from fedtune.common.audit import WireLog, content_arrays, content_tensors, save_arrays
from flwr.app import Message
from flwr.app.message_type import MessageType
from flwr.common import Array, ArrayRecord, ConfigRecord, MetricRecord
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.serverapp import Grid

# (round, message_type, replies_received, replies_expected)
ProgressFn = Callable[[int, str, int, int], None]


def _value_bytes(value: object) -> int:
    if isinstance(value, bytes):
        return len(value)
    if isinstance(value, str):
        return len(value.encode())
    if isinstance(value, list):
        return sum(_value_bytes(v) for v in value)
    return 8  # int / float / bool scalar


def _round_of(msg: Message) -> int:
    group = msg.metadata.group_id
    return int(group) if group.isdigit() else 0


def payload_bytes(msg: Message) -> int:
    """Bytes carried by ``msg``'s content (0 for an error reply)."""
    if not msg.has_content():
        return 0
    total = 0
    for record in msg.content.values():
        if isinstance(record, ArrayRecord):
            total += sum(len(arr.data) for arr in record.values() if isinstance(arr, Array))
        elif isinstance(record, ConfigRecord | MetricRecord):
            total += sum(_value_bytes(k) + _value_bytes(v) for k, v in record.items())
    return total


class MeteredGrid(Grid):
    """Delegates to a real ``Grid``; meters bytes and reports reply progress."""

    def __init__(
        self, grid: Grid, on_progress: ProgressFn | None = None, audit_dir: Path | None = None
    ) -> None:
        self._grid = grid
        self._on_progress = on_progress
        self._audit_dir = audit_dir / "server" if audit_dir else None
        self._wire_log = WireLog(self._audit_dir / "wire.jsonl") if self._audit_dir else None
        # round -> direction ("down"/"up") -> node id -> bytes
        self.bytes: dict[int, dict[str, dict[int, int]]] = defaultdict(
            lambda: defaultdict(lambda: defaultdict(int))
        )

    # --- metering ---------------------------------------------------------------------------
    def _meter(self, msgs: Iterable[Message], direction: str) -> None:
        for m in msgs:
            node = m.metadata.dst_node_id if direction == "down" else m.metadata.src_node_id
            size = payload_bytes(m)
            self.bytes[_round_of(m)][direction][node] += size
            if self._wire_log is not None:
                self._record(m, node, direction, size)

    def _record(self, msg: Message, node: int, direction: str, size: int) -> None:
        """Append the message's audit record; keep the arrays a site uploaded in a train reply."""
        has = msg.has_content()
        stage = ""
        if has and RECORD_KEY_CONFIGS in msg.content.config_records:
            stage = str(msg.content.config_records[RECORD_KEY_CONFIGS].get("stage", ""))
        self._wire_log.append(
            {
                "round": _round_of(msg),
                "node": node,
                "direction": direction,
                "kind": msg.metadata.message_type,
                "stage": stage,
                "payload_bytes": size,
                "tensors": content_tensors(msg.content) if has else [],
                "error": msg.error.reason if msg.has_error() else "",
            }
        )
        if direction == "up" and has and msg.metadata.message_type == MessageType.TRAIN:
            arrays = content_arrays(msg.content)
            if arrays:
                save_arrays(self._audit_dir / f"received-round-{_round_of(msg):03d}-node-{node}.npz", arrays)

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
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # noqa: D102
        replies = list(self._grid.pull_messages(message_ids))
        self._meter(replies, "up")
        return replies

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push ``messages`` and pull replies until all arrived or ``timeout`` passed."""
        messages = list(messages)
        kind, server_round = (
            (messages[0].metadata.message_type, _round_of(messages[0])) if messages else ("", 0)
        )
        pending = {i for i in self.push_messages(messages) if i}
        expected, replies = len(pending), []
        if self._on_progress:
            self._on_progress(server_round, kind, 0, expected)
        end_time = time.time() + (timeout or 0.0)
        while pending and (timeout is None or time.time() < end_time):
            got = list(self.pull_messages(pending))
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if got and self._on_progress:
                self._on_progress(server_round, kind, len(replies), expected)
            if pending:
                time.sleep(0.1)
        return replies
