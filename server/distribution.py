"""The coordinator's side of base-model distribution (the site's side: ``fedtune.client.base_model``).

Before a round, every connected site not yet known to hold the pinned base model is asked for its
status; each site that lacks it receives the checkpoint tensors chunk by chunk (every message at most
``base-model-chunk-mb``, far below gRPC's limit), all such sites at once, then a commit message with
the tensor table and the config/tokenizer files (with SHA-256). Chunks an earlier transfer already
delivered are skipped. The messages go through the coordinator's metered Grid (group ``base-model``,
round 0 in the wire record), so their bytes appear in the audit.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fedtune.common.audit import payload_bytes
from fedtune.common.model_store import CHUNK_RECORD, FILES_RECORD, RECORD, Outgoing, sha256
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.app.message_type import MessageType

from .wire import MeteredGrid, error_summary

log = logging.getLogger(__name__)
GROUP = "base-model"  # the messages' group id (not a round number: round 0 in the wire record)
DISTRIBUTION = "base_model_distribution.json"  # the coordinator's record of every check and transfer


@dataclass
class SiteTransfer:
    """What happened with one site: ``had`` it, ``received`` it, or ``failed`` (with the reason)."""

    node: int
    status: str
    bytes_down: int = 0
    chunks_sent: int = 0
    seconds: float = 0.0
    error: str = ""

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


class Distributor:
    """Sends the base model in ``model_dir`` (fingerprint ``expected``) to the sites that lack it."""

    def __init__(
        self, grid: MeteredGrid, model_dir: Path, expected: str, chunk_bytes: int, timeout: float
    ) -> None:
        self.grid = grid
        self.model_dir = model_dir
        self.expected = expected
        self.chunk_bytes = chunk_bytes
        self.timeout = timeout
        self._outgoing: Outgoing | None = None  # read on the first transfer only

    @property
    def outgoing(self) -> Outgoing:
        """The tensors and files to send (read once)."""
        if self._outgoing is None:
            self._outgoing = Outgoing.read(self.model_dir, self.chunk_bytes)
            if self._outgoing.fingerprint != self.expected:
                raise RuntimeError(
                    f"The coordinator's base model {self.model_dir} changed during the run: fingerprint "
                    f"{self._outgoing.fingerprint}, pinned {self.expected}."
                )
        return self._outgoing

    def _request(self, op: str, **fields: Any) -> dict[str, Any]:
        return {"op": op, "fingerprint": self.expected, **fields}

    def _send(self, contents: dict[int, RecordDict]) -> dict[int, Message]:
        """Send each node its content; ``{node: reply}`` for the replies that arrived in time."""
        msgs = [
            Message(content, dst_node_id=node, message_type=MessageType.QUERY, group_id=GROUP)
            for node, content in contents.items()
        ]
        return self.grid.replies_by_node(msgs, timeout=self.timeout)

    def _outcome(self, replies: dict[int, Message], node: int) -> dict[str, Any] | str:
        """The node's reply record, or the reason it failed."""
        reply = replies.get(node)
        if reply is None:
            return f"no reply within `base-model-timeout` {self.timeout:g} s"
        if reply.has_error():
            return error_summary(reply.error.reason)
        return dict(reply.content.config_records[RECORD])

    def run(self, nodes: list[int]) -> list[SiteTransfer]:
        """Check ``nodes`` and send the base model to those that lack it; one record per node."""
        start = time.perf_counter()
        status = self._request("status", **{"chunk-bytes": self.chunk_bytes})
        results = {node: SiteTransfer(node, "received") for node in nodes}
        replies = self._deliver({n: RecordDict({RECORD: ConfigRecord(status)}) for n in nodes}, results)
        pending: dict[int, set[int]] = {}  # node -> chunks it already holds
        for node in nodes:
            out = self._outcome(replies, node)
            if isinstance(out, str):
                continue  # `_deliver` marked it failed
            if out["have"]:
                results[node].status = "had"
            else:
                pending[node] = {int(i) for i in str(out["received"]).split(",") if i}
        if pending:
            self._transfer(pending, results)
        seconds = time.perf_counter() - start
        for r in results.values():
            if r.status != "had":
                r.seconds = seconds
            if r.status == "failed":
                log.warning("Site node %s has no usable base model: %s", r.node, r.error)
        return [results[n] for n in nodes]

    def _transfer(self, pending: dict[int, set[int]], results: dict[int, SiteTransfer]) -> None:
        out = self.outgoing
        chunks = out.plan.chunks
        log.info(
            "Sending the base model (%.1f MB in %d chunk(s) of <= %.1f MB) to site node(s) %s",
            out.plan.total_bytes / 1e6,
            len(chunks),
            self.chunk_bytes / 1e6,
            sorted(pending),
        )
        for index in range(len(chunks)):
            targets = [
                n for n, have in pending.items() if index not in have and results[n].status != "failed"
            ]
            if not targets:
                continue
            fields = {"index": index, "chunks": len(chunks), "chunk-bytes": self.chunk_bytes}
            content = RecordDict(
                {
                    RECORD: ConfigRecord(self._request("chunk", **fields)),
                    CHUNK_RECORD: ArrayRecord({k: Array(v) for k, v in out.chunk_arrays(index).items()}),
                }
            )
            self._deliver(dict.fromkeys(targets, content), results)
            log.info("Base model chunk %d/%d delivered to %d site(s)", index + 1, len(chunks), len(targets))
        targets = [n for n in pending if results[n].status != "failed"]
        if targets:
            commit = self._request(
                "commit",
                table=out.plan.table_json(),
                files=json.dumps({rel: sha256(data) for rel, data in out.files.items()}),
            )
            content = RecordDict({RECORD: ConfigRecord(commit), FILES_RECORD: ConfigRecord(dict(out.files))})
            self._deliver(dict.fromkeys(targets, content), results)

    def _deliver(
        self, contents: dict[int, RecordDict], results: dict[int, SiteTransfer]
    ) -> dict[int, Message]:
        """Send, meter, and mark the nodes whose reply failed; return the replies."""
        replies = self._send(contents)
        for node, content in contents.items():
            sent = payload_bytes(Message(content, dst_node_id=node, message_type=MessageType.QUERY))
            results[node].bytes_down += sent
            results[node].chunks_sent += int(CHUNK_RECORD in content.array_records)
            outcome = self._outcome(replies, node)
            if isinstance(outcome, str):
                results[node].status, results[node].error = "failed", outcome
        return replies
