"""Run the real coordinator against real ClientApps in this process: a Flower ``Grid`` without Ray.

:class:`LocalGrid` hands every message to the fedtune ClientApp of its node, synchronously, with a
per-node ``Context`` that lives across messages (as a SuperNode's does) and a per-node model cache
(as a site's own process has: the coordinator never shares a model object with a site), and turns
an exception into an error reply the way Flower does. :func:`run_federation` runs
:func:`run_coordinator` on it. It tests the coordinator's logic in seconds on a tiny model;
Ray, processes and timing are the end-to-end tests' business.
"""

from __future__ import annotations

import copy
import functools
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import fedtune.common.model as model_module
from fedtune.client.app import make_client_app
from fedtune.common.config import FedConfig, parse_run_config
from fedtune.server.federation import run_coordinator
from fedtune.server.run_state import RunState
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.run import Run

# a fast federation on the Pima table: tiny encoder, 3 sites, 2 rounds, 4 local steps of 16
FAST = {
    "task": "diabetes",
    "num-server-rounds": 2,
    "min-clients": 3,
    "batch-size": 16,
    "local-steps": 4,
    "max-length": 32,
    "partitioning": "iid",
}


class LocalGrid(Grid):
    """A Grid whose nodes are ClientApps in this process (node ids 101, 102, ...)."""

    def __init__(self, app: ClientApp, node_configs: list[dict[str, Any]]) -> None:
        self.app = app
        self.contexts = {
            101 + i: Context(run_id=1, node_id=101 + i, node_config=nc, state=RecordDict(), run_config={})
            for i, nc in enumerate(node_configs)
        }
        # each node's own process-level model cache (fedtune.common.model._built in its process)
        self._builders = {node: functools.cache(model_module._built.__wrapped__) for node in self.contexts}
        self.silent: set[int] = set()  # nodes that never reply (dropped out)
        self.delivered: list[Message] = []  # every message a node received
        self._replies: dict[str, Message] = {}
        self._run = Run.create_empty(run_id=1)

    def set_run(self, run: Run) -> None:  # noqa: D102
        self._run = run

    @property
    def run(self) -> Run:  # noqa: D102
        return self._run

    def create_message(  # noqa: D102, PLR0913 - Flower's signature
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:  # noqa: D102
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # noqa: D102
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            ids.append(msg.metadata.message_id)
            node = msg.metadata.dst_node_id
            if node in self.silent:
                continue
            self.delivered.append(msg)
            shared, model_module._built = model_module._built, self._builders[node]
            try:  # a copy, as if it had crossed the wire: neither side sees the other's later edits
                reply = self.app(message=copy.deepcopy(msg), context=self.contexts[node])
            except Exception as ex:  # noqa: BLE001 - Flower's own format for a ClientApp's exception
                reply = Message(Error(code=2, reason=str(type(ex)) + ":<'" + str(ex) + "'>"), reply_to=msg)
            finally:
                model_module._built = shared
            self._replies[msg.metadata.message_id] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # noqa: D102
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(  # noqa: D102
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


def fast_config(out: Path, base_model: Path, **overrides: Any) -> FedConfig:
    """:data:`FAST` on ``base_model``, writing under ``out``, with kebab-case ``overrides``."""
    extra = {k.replace("_", "-"): v for k, v in overrides.items()}
    return parse_run_config({**FAST, "base-model": str(base_model), "out-dir": str(out), **extra})


def run_federation(cfg: FedConfig, sites: int = 3, grid: LocalGrid | None = None) -> RunState:
    """Run the coordinator on ``sites`` simulated sites in this process; return its final state."""
    if grid is None:
        grid = local_grid(cfg, sites)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    return run_coordinator(grid, context, cfg)


def local_grid(cfg: FedConfig, sites: int = 3) -> LocalGrid:
    """A grid of ``sites`` simulated sites sharing ``cfg``'s base model, their records under its audit."""
    app = make_client_app(
        str(Path(cfg.out_dir) / "audit") if cfg.audit else None,
        base_model=cfg.base_model,
        site_log_dir=str(Path(cfg.out_dir) / "site-logs"),
    )
    return LocalGrid(app, [{"partition-id": i, "num-partitions": sites} for i in range(sites)])
