"""A long-lived site worker: the base model, tokenizer and data stay loaded across a run's messages.

Flower 1.42 handles every message of a deployed site in a fresh ``flwr-clientapp`` process (flwr
issue #3670), so each train or evaluate message would import torch and load the base model again.
``fedtune site-worker --socket PATH`` runs beside the SuperNode, as the same user, for as long as
the site takes part; a SuperNode whose node config sets ``worker-socket=PATH`` gets a ClientApp
that hands each train and evaluate message's adapter and instruction to the worker
(:class:`WorkerClient`) and returns its answer. The ClientApp stays a normal Flower ClientApp: its
SecAgg+, DP, audit and site-error mods run as before, and it never imports torch. Simulation keeps
its in-process path.

The channel is a Unix socket that only the worker's user can open: the socket is created ``0600``,
and each connection must pass ``multiprocessing.connection``'s HMAC challenge with a random key that
the worker writes to ``PATH.key`` (``0600``) before anything is unpickled. On connect both sides
compare :func:`versions` (protocol, Python, fedtune's code, flwr, torch, transformers, peft); a
mismatch, a worker that is not running or one that stops mid-message fails the message with a
:class:`~fedtune.common.site_errors.SiteWorkerError` that names the socket and how to (re)start it.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import logging
import os
import platform
import secrets
import threading
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from typing import Any

import numpy as np
from fedtune.common.files import write_bytes_atomic
from fedtune.common.site_config import site_config
from fedtune.common.site_errors import SiteWorkerError
from flwr.client import NumPyClient

log = logging.getLogger("fedtune.site-worker")

PROTOCOL = 1
LIBRARIES = ("flwr", "torch", "transformers", "peft")
MAX_SOCKET_PATH = 100  # AF_UNIX paths are limited to about 107 bytes
METHODS = ("fit", "evaluate")


@dataclass(frozen=True)
class Request:
    """One message's work: ``SiteClient.<method>(parameters, config)`` for the site of ``node_config``."""

    method: str
    parameters: list[np.ndarray]
    config: dict[str, Any]
    node_config: dict[str, Any]
    node_id: int


def key_path(socket_path: Path) -> Path:
    """Where the worker on ``socket_path`` keeps its connection key."""
    return socket_path.with_name(socket_path.name + ".key")


def start_hint(socket_path: Path) -> str:
    """How to start the worker a SuperNode's node config names."""
    return f"start it beside the SuperNode, as the same user: `fedtune site-worker --socket {socket_path}`"


def versions() -> dict[str, str]:
    """What the ClientApp and its worker must share: protocol, Python, fedtune's code and the libraries."""
    return {
        "protocol": str(PROTOCOL),
        "python": platform.python_version(),
        "fedtune": _code_stamp(),
        **{lib: importlib.metadata.version(lib) for lib in LIBRARIES},
    }


def _code_stamp() -> str:
    """Hash of fedtune's installed ``.py`` files (path, size, mtime): changes when its code does."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for sub in ("common", "client"):
        for path in sorted((root / sub).resolve().glob("*.py")):
            st = path.stat()
            digest.update(f"{sub}/{path.name}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def version_mismatch(mine: dict[str, str], theirs: dict[str, str]) -> str:
    """The fields where two :func:`versions` differ, as ``name: mine vs theirs`` ("" when equal)."""
    return ", ".join(
        f"{k}: {mine.get(k, '-')} here vs {theirs.get(k, '-')} in the worker"
        for k in sorted(set(mine) | set(theirs))
        if mine.get(k) != theirs.get(k)
    )


# --- the ClientApp's side ------------------------------------------------------------------------
class WorkerClient(NumPyClient):
    """A site whose train and evaluate messages run in its worker on ``socket_path``."""

    def __init__(self, socket_path: Path, node_config: dict[str, Any], node_id: int) -> None:
        self.socket_path = Path(socket_path)
        self.node_config = node_config
        self.node_id = node_id

    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]):  # noqa: ANN201
        """Train in the worker (see ``SiteClient.fit``)."""
        return self._call("fit", parameters, config)

    def evaluate(self, parameters: list[np.ndarray], config: dict[str, Any]):  # noqa: ANN201
        """Score in the worker (see ``SiteClient.evaluate``)."""
        return self._call("evaluate", parameters, config)

    def _call(self, method: str, parameters: list[np.ndarray], config: dict[str, Any]) -> Any:
        request = Request(method, list(parameters), dict(config), dict(self.node_config), self.node_id)
        conn = connect(self.socket_path)
        try:
            conn.send(request)
            kind, value = conn.recv()
        except (EOFError, OSError) as err:
            raise SiteWorkerError(
                f"The site worker on {self.socket_path} stopped while handling a {method} message ({err!r}); "
                f"see its log, then {start_hint(self.socket_path)}."
            ) from None
        finally:
            conn.close()
        if kind == "error":
            raise value
        return value


def connect(socket_path: Path) -> Connection:
    """An authenticated connection to the worker on ``socket_path`` whose versions match this process's.

    Raises
    ------
    SiteWorkerError
        No worker answers there, its key is unreadable or wrong, or its versions differ.
    """
    mine = versions()
    try:
        key = key_path(socket_path).read_bytes()
        conn = Client(str(socket_path), family="AF_UNIX", authkey=key)
        conn.send(mine)
        theirs = conn.recv()
    except (OSError, EOFError) as err:
        raise SiteWorkerError(
            f"No site worker answers on {socket_path} (node config `worker-socket`): {err!r}; "
            f"{start_hint(socket_path)}."
        ) from None
    mismatch = version_mismatch(mine, theirs)
    if mismatch:
        conn.close()
        raise SiteWorkerError(
            f"The site worker on {socket_path} runs other code than this SuperNode ({mismatch}); restart "
            f"it from this installation: {start_hint(socket_path)}."
        )
    return conn


# --- the worker's side ---------------------------------------------------------------------------
def serve(socket_path: Path, stop: threading.Event | None = None) -> None:
    """Answer ClientApps on ``socket_path`` until ``stop`` is set (see :func:`wake`) or the process ends.

    Raises
    ------
    ValueError
        When the path is too long for a Unix socket, or another worker already answers there.
    """
    socket_path = Path(socket_path).absolute()
    if len(str(socket_path)) > MAX_SOCKET_PATH:
        raise ValueError(
            f"--socket {socket_path} is {len(str(socket_path))} characters; Unix sockets take at most "
            f"{MAX_SOCKET_PATH}: choose a shorter path (e.g. under /tmp or /run)."
        )
    _clear_stale(socket_path)
    socket_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = secrets.token_bytes(32)
    old = os.umask(0o177)  # the key file and the socket: readable and writable by this user only
    try:
        write_bytes_atomic(key_path(socket_path), key)
        listener = Listener(str(socket_path), family="AF_UNIX", authkey=key)
    finally:
        os.umask(old)
    lock = threading.Lock()  # one message at a time on the one model
    mine = versions()  # of the code this process loaded: taken once, not from files changed since
    log.info("fedtune site worker on %s (%s)", socket_path, mine)
    try:
        with listener:
            while stop is None or not stop.is_set():
                try:
                    conn = listener.accept()
                except Exception as err:  # noqa: BLE001 - a failed handshake must not stop the worker
                    if stop is None or not stop.is_set():
                        log.warning("Refused a connection on %s: %r", socket_path, err)
                    continue
                threading.Thread(target=_answer, args=(conn, lock, mine), daemon=True).start()
    finally:
        key_path(socket_path).unlink(missing_ok=True)
        socket_path.unlink(missing_ok=True)


def wake(socket_path: Path) -> None:
    """Make a worker waiting in ``accept`` look at its ``stop`` event (an unauthenticated knock)."""
    with contextlib.suppress(OSError):
        Client(str(socket_path), family="AF_UNIX").close()


def _clear_stale(socket_path: Path) -> None:
    """Remove the socket a dead worker left; refuse when a live one answers there."""
    if not socket_path.exists():
        return
    try:
        Client(str(socket_path), family="AF_UNIX").close()
    except OSError:
        socket_path.unlink()
        return
    raise ValueError(f"A site worker already answers on {socket_path}; stop it first or choose another path.")


def _answer(conn: Connection, lock: threading.Lock, mine: dict[str, str]) -> None:
    """Serve one ClientApp connection: the version check, then its requests in turn."""
    with conn:
        try:
            conn.send(mine)
            if version_mismatch(mine, conn.recv()):
                return
            while True:
                request: Request = conn.recv()
                with lock:
                    reply = _run(request)
                conn.send(reply)
        except (EOFError, OSError):
            return  # the ClientApp went away


def _run(request: Request) -> tuple[str, Any]:
    """``("result", value)`` of the request, or ``("error", the exception)``; details logged here."""
    from .site import SiteClient  # torch, transformers, peft: loaded once, kept across messages

    start = time.perf_counter()
    try:
        if request.method not in METHODS:
            raise ValueError(f"Unknown site worker method {request.method!r}; expected one of {METHODS}.")
        client = SiteClient(site_config(request.node_config), "", request.node_id)
        result = getattr(client, request.method)(request.parameters, request.config)
        log.info("%s for node %s in %.1f s", request.method, request.node_id, time.perf_counter() - start)
        return "result", result
    except Exception as err:  # noqa: BLE001 - the ClientApp raises it, its site-errors mod categorises it
        log.error("%s failed:\n%s", request.method, traceback.format_exc())
        return "error", _picklable(err)


def _picklable(err: Exception) -> Exception:
    """``err`` if it survives pickling, else a ``RuntimeError`` with its type and message."""
    import pickle

    try:
        pickle.loads(pickle.dumps(err))
    except Exception:  # noqa: BLE001
        return RuntimeError(f"{type(err).__name__}: {err}")
    return err
