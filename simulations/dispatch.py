"""Flower's simulation engine with its message pick-up asking only the nodes that have mail.

Flower 1.42's simulation engine (``flwr.server.superlink.fleet.vce.vce_api``) hands messages to its
backend from one thread, ``add_messages_to_queue``: every 0.1 s it asks the in-memory LinkState for
each registered node's next message, and each ask scans every stored message. With N simulated
hospitals and M messages in flight that is N x M checks per pass, under the state's lock and the
GIL: at 10,000 hospitals and 10 in flight, 100,000 checks every 0.1 s, which starves the
coordinator's thread in the same process (``fedtune bench scale``: rounds at 1.74x those of 10
hospitals with Flower's loop, 1.05x with this one).

:func:`add_messages_to_queue` is the same loop asking only the nodes that have an undelivered
message (one pass over the stored messages finds them); each such node is asked with Flower's own
``get_message_ins``, which checks, delivers and marks the message as before. Nodes are asked in
Flower's order. :func:`use_fast_dispatch` installs it in the engine for the simulations this
process runs. The rest of the engine (backend, actors, LinkState, the ServerApp's Grid) is Flower's.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from queue import Queue
from typing import Any

from flwr.app import Message
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.linkstate import InMemoryLinkState, LinkState

POLL_SECONDS = 0.1  # Flower's pause between passes


def nodes_with_mail(state: LinkState, nodes: Iterable[int]) -> list[int]:
    """The ``nodes`` (in their order) that have an undelivered message in ``state``.

    A LinkState other than Flower's in-memory one gets every node back (Flower's own behaviour).
    """
    if not isinstance(state, InMemoryLinkState):
        return list(nodes)
    with state.lock:
        waiting = {
            msg.metadata.dst_node_id
            for msg in state.message_ins_store.values()
            if msg.metadata.delivered_at == ""
        }
    return [node for node in nodes if node in waiting] if waiting else []


def add_messages_to_queue(
    state: LinkState, queue: Queue[Message], nodes_mapping: dict[int, Any], f_stop: threading.Event
) -> None:
    """Flower's ``add_messages_to_queue``, asking only the nodes that have an undelivered message."""
    while not f_stop.is_set():
        for node_id in nodes_with_mail(state, nodes_mapping):
            for msg in state.get_message_ins(node_id=node_id, limit=1):
                queue.put(msg)
        f_stop.wait(POLL_SECONDS)


def use_fast_dispatch() -> None:
    """Make Flower's simulation engine in this process pick up messages with :func:`add_messages_to_queue`."""
    vce_api.add_messages_to_queue = add_messages_to_queue  # type: ignore[assignment]
