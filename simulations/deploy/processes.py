"""Child processes that are always stopped with their whole process tree (no orphans).

Used by ``fedtune deploy-local``: ``flower-superlink`` and ``flower-supernode`` start helper
processes (SuperExec, ServerApp, ClientApp) in sessions of their own, so stopping a process
group is not enough; :class:`ProcessGroup` collects every descendant before signalling.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import psutil

HOST = "127.0.0.1"


class ProcessGroup:
    """Child processes, each in its own session, stopped together with all their descendants.

    ``flower-superlink`` and ``flower-supernode`` start their SuperExec in a new session of its
    own, so killing a process group is not enough: :meth:`stop` first collects every descendant
    (with ``psutil``), then sends SIGTERM to all of them, waits, and SIGKILLs what is left. Used as
    a context manager it also stops everything on SIGTERM/SIGHUP (turned into ``SystemExit``),
    Ctrl-C (``KeyboardInterrupt``) and, as a last resort, at interpreter exit.

    Parameters
    ----------
    log_dir
        Each process writes stdout and stderr to ``log_dir/<name>.log``.
    """

    def __init__(self, log_dir: str | Path) -> None:
        self.log_dir = Path(log_dir)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: dict[str, IO[bytes]] = {}
        self._previous: dict[int, Any] = {}
        self._atexit = False

    def start(
        self,
        name: str,
        cmd: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start ``cmd`` in a new session, output to ``log_dir/<name>.log``."""
        if name in self.procs:
            raise ValueError(f"A process named {name!r} was already started.")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = (self.log_dir / f"{name}.log").open("ab")
        log.write(f"$ {' '.join(cmd)}\n".encode())
        log.flush()
        try:
            proc = subprocess.Popen(
                list(cmd),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                start_new_session=True,
            )
        except BaseException:
            log.close()
            raise
        self.procs[name] = proc
        self._logs[name] = log
        if not self._atexit:
            atexit.register(self.stop)
            self._atexit = True
        return proc

    def log_path(self, name: str) -> Path:
        """Where process ``name`` logs."""
        return self.log_dir / f"{name}.log"

    def alive(self, name: str) -> bool:
        """Whether process ``name`` is still running."""
        return self.procs[name].poll() is None

    def tree(self, names: Sequence[str] | None = None) -> list[psutil.Process]:
        """The processes ``names`` (default: all) and all their living descendants."""
        found: dict[int, psutil.Process] = {}
        for name in names if names is not None else list(self.procs):
            proc = self.procs[name]
            if proc.poll() is not None:
                continue
            try:
                root = psutil.Process(proc.pid)
                for p in [root, *root.children(recursive=True)]:
                    found[p.pid] = p
            except psutil.NoSuchProcess:
                continue
        return list(found.values())

    def stop(self, names: Sequence[str] | None = None, timeout: float = 10.0) -> None:
        """SIGTERM ``names`` (default: all, newest first) and descendants; SIGKILL after ``timeout``."""
        names = list(names) if names is not None else list(reversed(self.procs))
        in_main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if in_main else None  # a 2nd Ctrl-C
        try:
            self._stop(names, timeout)
        finally:
            if in_main:
                signal.signal(signal.SIGINT, previous)

    def _stop(self, names: list[str], timeout: float) -> None:
        own = [self.procs[name] for name in names]
        own_pids = {proc.pid for proc in own}
        # collect descendants before signalling: once their parent is gone they are re-parented and lost
        others = [p for p in self.tree(names) if p.pid not in own_pids]
        self._signal(own, others, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and (
            any(proc.poll() is None for proc in own) or any(_running(p) for p in others)
        ):
            time.sleep(0.1)
        self._signal(own, others, signal.SIGKILL)  # what ignored SIGTERM (no-op for the exited)
        for proc in own:
            try:
                proc.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                pass
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and any(_running(p) for p in others):
            time.sleep(0.1)
        for name in names:
            log = self._logs.pop(name, None)
            if log is not None:
                log.close()

    @staticmethod
    def _signal(own: list[subprocess.Popen[bytes]], others: list[psutil.Process], sig: int) -> None:
        """Send ``sig`` to each own process's group (while it has members) and to each descendant."""
        for proc in own:
            try:
                os.killpg(proc.pid, sig)  # the group outlives its leader while members remain
            except (ProcessLookupError, PermissionError):
                pass
        for p in others:
            if _running(p):
                try:
                    p.send_signal(sig)
                except psutil.NoSuchProcess:
                    pass

    def __enter__(self) -> ProcessGroup:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGHUP):
                self._previous[sig] = signal.signal(sig, _raise_exit)
            # Ctrl-C stops the group even where SIGINT was inherited as ignored (a background job)
            self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.default_int_handler)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop()
        finally:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)
            self._previous.clear()
            if self._atexit:
                atexit.unregister(self.stop)
                self._atexit = False


def _running(p: psutil.Process) -> bool:
    """Whether ``p`` still runs (a zombie has finished; ``is_running`` also guards against pid reuse)."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _raise_exit(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def free_port(host: str = HOST) -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float, alive: Any = None) -> None:
    """Block until ``host:port`` accepts TCP connections.

    Raises
    ------
    TimeoutError
        Nothing listens after ``timeout`` seconds, or ``alive()`` turned false.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            raise TimeoutError(f"the process that should listen on {host}:{port} exited")
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:g} s")
