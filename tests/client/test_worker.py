"""The long-lived site worker and the ClientApp's channel to it (``client/worker.py``)."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path

import numpy as np
import pytest
from conftest import fake_task_identity
from fedtune.client.worker import WorkerClient, connect, key_path, serve, versions, wake
from fedtune.common import model as model_module
from fedtune.common.site_errors import CATEGORIES, SiteWorkerError, category_of
from local_grid import LocalGrid, fast_config, run_federation
from safetensors.numpy import load_file

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _wait_for(path: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


@pytest.fixture
def folder() -> Iterator[Path]:
    """A short folder for sockets (Unix socket paths are limited to about 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="fw-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def worker(folder: Path) -> Iterator[Path]:
    """A worker answering on ``folder/w.sock`` in a thread of this process."""
    sock, stop = folder / "w.sock", threading.Event()
    thread = threading.Thread(target=serve, args=(sock, stop), daemon=True)
    thread.start()
    _wait_for(sock)
    yield sock
    stop.set()
    wake(sock)
    thread.join(10)
    assert not thread.is_alive() and not sock.exists() and not key_path(sock).exists()


def _fake_worker(sock: Path, answer: Callable[[Connection], None]) -> threading.Thread:
    """A listener on ``sock`` with a key file, whose one connection ``answer`` handles."""
    key = os.urandom(32)
    key_path(sock).write_bytes(key)
    listener = Listener(str(sock), family="AF_UNIX", authkey=key)

    def run() -> None:
        with listener, listener.accept() as conn:
            answer(conn)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_a_federation_through_site_workers_gives_the_adapter_of_one_without(
    tmp_path: Path, tiny_base_model: Path, worker: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: the same 3-site federation twice; the second hands training and scoring to the worker
    cfg = fast_config(tmp_path / "direct", tiny_base_model, secure_aggregation=True)
    with fake_task_identity():
        run_federation(cfg)
        via = fast_config(tmp_path / "worker", tiny_base_model, secure_aggregation=True)
        nodes = [
            {
                "partition-id": i,
                "num-partitions": 3,
                "base-model": str(tiny_base_model),
                "worker-socket": str(worker),
            }
            for i in range(3)
        ]
        from fedtune.client.app import make_client_app

        # Execute
        with caplog.at_level(logging.INFO, logger="fedtune.site-worker"):
            state = run_federation(via, grid=LocalGrid(make_client_app(), nodes))

    # Assert: the same shared adapter (within SecAgg+'s quantisation), every site trained every round
    a = load_file(str(tmp_path / "direct" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "worker" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-3)
    assert [len(r.site_train_examples) for r in state.rounds.records[1:]] == [3, 3]
    served = [r.getMessage().split(" for ")[0] for r in caplog.records if r.name == "fedtune.site-worker"]
    assert served.count("fit") == 6  # the worker trained every site in every round


def test_the_worker_keeps_the_model_across_messages(tiny_base_model: Path, worker: Path) -> None:
    from fedtune.common import instructions
    from fedtune.common.adapters import get_adapter_arrays
    from fedtune.common.base_files import fingerprint
    from fedtune.common.config import parse_run_config
    from fedtune.common.model import bring_up

    # Prepare: two rounds' train messages for one site
    cfg = parse_run_config(
        {"task": "diabetes", "base-model": str(tiny_base_model), "local-steps": 2, "max-length": 32}
    )
    node = {"partition-id": 0, "num-partitions": 3, "base-model": str(tiny_base_model)}
    client = WorkerClient(worker, node, node_id=7)
    start = get_adapter_arrays(bring_up(cfg, 2, tiny_base_model).model)
    first = client.fit(start, instructions.encode(cfg, 1, fingerprint(tiny_base_model)))
    builds = model_module._built.cache_info().misses

    # Execute
    arrays, examples, metrics = client.fit(
        first[0], instructions.encode(cfg, 2, fingerprint(tiny_base_model))
    )

    # Assert: trained again without building a model; the site's answer came back whole
    assert model_module._built.cache_info().misses == builds
    assert [a.shape for a in arrays] == [a.shape for a in first[0]] and examples == first[1] > 0
    assert metrics["train_steps"] == 2


def test_the_socket_and_its_key_are_private_to_the_workers_user(worker: Path) -> None:
    for path in (worker, key_path(worker)):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_a_connection_without_the_key_is_refused_and_the_worker_goes_on(worker: Path) -> None:
    # Execute / Assert
    with pytest.raises(AuthenticationError):
        Client(str(worker), family="AF_UNIX", authkey=b"not the key")
    connect(worker).close()  # still serving


def test_a_site_error_in_the_worker_arrives_as_its_own_type(worker: Path) -> None:
    from fedtune.common.config import ConfigError

    # Prepare: a misspelt node-config key, which the site refuses
    client = WorkerClient(worker, {"data_path": "/d/site.csv"}, node_id=3)

    # Execute / Assert: the site-errors mod sees a ConfigError, as without a worker
    with pytest.raises(ConfigError, match="`data_path` unknown to a fedtune site"):
        client.evaluate([], {})


def test_no_worker_names_the_socket_and_how_to_start_it(folder: Path) -> None:
    with pytest.raises(
        SiteWorkerError, match=rf"No site worker answers on {folder}/none\.sock .*site-worker --socket"
    ):
        WorkerClient(folder / "none.sock", {}, node_id=1).fit([], {})


def test_a_worker_running_other_code_is_refused(folder: Path) -> None:
    # Prepare: a worker whose torch differs
    thread = _fake_worker(
        folder / "w.sock", lambda conn: (conn.send({**versions(), "torch": "0.0"}), conn.recv())
    )

    # Execute / Assert
    with pytest.raises(SiteWorkerError, match=r"other code .*torch: \S+ here vs 0\.0 in the worker.*restart"):
        connect(folder / "w.sock")
    thread.join(10)


def test_a_worker_started_before_a_code_change_is_refused(
    worker: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedtune.client import worker as worker_module

    # Prepare: fedtune's files change on disk after the worker loaded its code
    monkeypatch.setattr(worker_module, "_code_stamp", lambda: "new-code")

    # Execute / Assert: the worker still reports the code it runs, so the ClientApp refuses it
    with pytest.raises(SiteWorkerError, match=r"fedtune: new-code here vs \S+ in the worker"):
        connect(worker)


def test_a_worker_that_stops_mid_message_fails_the_message_clearly(folder: Path) -> None:
    # Prepare: a worker that reads the request and dies
    thread = _fake_worker(folder / "w.sock", lambda conn: (conn.send(versions()), conn.recv(), conn.recv()))

    # Execute / Assert
    with pytest.raises(SiteWorkerError, match=r"stopped while handling a fit message.*see its log"):
        WorkerClient(folder / "w.sock", {}, node_id=1).fit([np.zeros(2, np.float32)], {})
    thread.join(10)


def test_a_second_worker_on_a_live_socket_is_refused(worker: Path) -> None:
    with pytest.raises(ValueError, match="already answers"):
        serve(worker)


def test_a_socket_left_by_a_dead_worker_is_replaced(folder: Path) -> None:
    # Prepare: a socket file nobody listens on
    sock = folder / "w.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(sock))
    stop = threading.Event()
    thread = threading.Thread(target=serve, args=(sock, stop), daemon=True)

    # Execute
    thread.start()
    _wait_for(key_path(sock))
    time.sleep(0.2)

    # Assert
    connect(sock).close()
    stop.set()
    wake(sock)
    thread.join(10)


def test_the_coordinator_learns_only_the_worker_category() -> None:
    assert category_of(SiteWorkerError("No site worker answers on /tmp/x.sock")) == "worker"
    assert "worker-socket" in CATEGORIES["worker"][1]


def test_the_cli_serves_until_sigterm_and_removes_its_socket(folder: Path) -> None:
    # Prepare
    sock = folder / "cli.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedtune.simulations.cli", "site-worker", "--socket", str(sock)],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for(sock, timeout=120)

        # Execute
        connect(sock).close()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()

    # Assert
    assert proc.returncode == 0, err[-2000:]
    assert not sock.exists() and not key_path(sock).exists()
    assert "fedtune site worker on" in err


def test_the_cli_refuses_a_socket_path_too_long(folder: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedtune.simulations.cli",
            "site-worker",
            "--socket",
            str(folder / ("x" * 120)),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "Unix sockets take at most 100" in proc.stderr


def test_an_exception_that_cannot_be_pickled_crosses_as_its_type_and_message(worker: Path) -> None:
    from fedtune.client.worker import _picklable

    class UnpicklableError(Exception):
        def __init__(self) -> None:
            super().__init__("row 7 of /d/site.csv")
            self.hook = lambda: None  # lambdas do not pickle

    # Execute
    sent = _picklable(UnpicklableError())

    # Assert: the site-errors mod still gets a message to log; a picklable error crosses as itself
    assert type(sent) is RuntimeError and str(sent) == "UnpicklableError: row 7 of /d/site.csv"
    err = ValueError("bad")
    assert _picklable(err) is err


def test_a_request_for_another_method_is_refused(worker: Path) -> None:
    from fedtune.client.worker import Request

    # Execute
    conn = connect(worker)
    try:
        conn.send(Request("get_parameters", [], {}, {}, 1))
        kind, value = conn.recv()
    finally:
        conn.close()

    # Assert
    assert kind == "error" and isinstance(value, ValueError) and "'get_parameters'" in str(value)
