"""The simulation engine's message pick-up that asks only the nodes with mail."""

from __future__ import annotations

import threading
import time
from queue import Queue
from types import SimpleNamespace
from typing import Any

from fedtune.simulations import dispatch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.clientapp import ClientApp
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.superlink.federation import NoOpFederationManager


def _in_memory_state(mail: dict[str, tuple[int, str]]) -> Any:
    state = LinkStateFactory(":flwr-in-memory:", NoOpFederationManager(), ObjectStoreFactory()).state()
    for msg_id, (node, delivered_at) in mail.items():
        state.message_ins_store[msg_id] = SimpleNamespace(
            metadata=SimpleNamespace(dst_node_id=node, delivered_at=delivered_at)
        )
    return state


def test_only_nodes_with_an_undelivered_message_are_asked_in_flowers_order() -> None:
    state = _in_memory_state({"a": (30, ""), "b": (10, ""), "c": (20, "2026-01-01T00:00:00"), "d": (99, "")})
    assert dispatch.nodes_with_mail(state, [10, 20, 30, 40]) == [10, 30]  # 20's is delivered, 99 is no node
    assert dispatch.nodes_with_mail(_in_memory_state({}), range(10_000)) == []


def test_another_link_state_gets_every_node_asked_as_flower_does() -> None:
    assert dispatch.nodes_with_mail(SimpleNamespace(), [3, 1, 2]) == [3, 1, 2]  # type: ignore[arg-type]


def test_one_pass_queues_what_flowers_get_message_ins_hands_out_for_the_nodes_with_mail() -> None:
    asked: list[int] = []
    stop = threading.Event()
    state = _in_memory_state({"a": (7, ""), "b": (5, "")})

    def get_message_ins(node_id: int, limit: int) -> list[str]:
        asked.append(node_id)
        stop.set()  # the loop ends after this pass
        return [f"msg-for-{node_id}"] if limit == 1 else []

    state.get_message_ins = get_message_ins
    queue: Queue[Any] = Queue()
    dispatch.add_messages_to_queue(state, queue, dict.fromkeys(range(10)), stop)
    assert asked == [5, 7]
    assert [queue.get_nowait() for _ in range(queue.qsize())] == ["msg-for-5", "msg-for-7"]


def test_a_flower_simulation_of_many_nodes_delivers_through_it(monkeypatch) -> None:
    # Prepare: Flower's engine with the fast pick-up; 40 nodes, 3 of them asked
    monkeypatch.setattr(vce_api, "add_messages_to_queue", vce_api.add_messages_to_queue)  # restored after
    dispatch.use_fast_dispatch()
    assert vce_api.add_messages_to_queue is dispatch.add_messages_to_queue
    replies: dict[int, int] = {}
    client = ClientApp()

    @client.query()
    def answer(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        return Message(RecordDict({"r": ConfigRecord({"pid": pid})}), reply_to=msg)

    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        deadline = time.monotonic() + 60
        while len(nodes := sorted(grid.get_node_ids())) < 40 and time.monotonic() < deadline:
            time.sleep(0.2)  # the engine registers its nodes as it starts
        nodes = nodes[:3]
        msgs = [
            Message(RecordDict({"q": ConfigRecord({"x": 1})}), dst_node_id=n, message_type=MessageType.QUERY)
            for n in nodes
        ]
        for reply in grid.send_and_receive(msgs, timeout=120):
            replies[reply.metadata.src_node_id] = int(reply.content.config_records["r"]["pid"])

    # Execute
    run_simulation(
        server_app=server,
        client_app=client,
        num_supernodes=40,
        backend_config={"client_resources": {"num_cpus": 1}, "init_args": {"include_dashboard": False}},
    )

    # Assert: each asked node answered, once
    assert len(replies) == 3 and len(set(replies.values())) == 3
