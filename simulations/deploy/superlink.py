"""A SuperLink and SuperNodes on this machine's loopback interface, driven through the ``flwr`` CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .certs import CertFiles
from .flower import CONNECTION, DeployError, flower_env, tool, write_connection
from .processes import HOST, ProcessGroup, free_port, wait_for_port


class LocalDeployment:
    """A SuperLink and SuperNodes on ``127.0.0.1`` under ``out``: ``flwr`` CLI calls, processes, logs.

    Layout: ``out/certs`` (TLS + site keys), ``out/app`` (the app submitted), ``out/flwr/<process>``
    (each process's ``FLWR_HOME``), ``out/logs`` (one log per process + ``flwr-cli.log``).
    """

    def __init__(self, out: Path, certs: CertFiles, procs: ProcessGroup, threads: int | None = None) -> None:
        self.out = out
        self.threads = threads
        self.certs = certs
        self.procs = procs
        self.port = free_port()
        self.address = f"{HOST}:{self.port}"
        self.cli_home = out / "flwr" / "cli"
        (out / "logs").mkdir(parents=True, exist_ok=True)
        write_connection(self.cli_home, self.address, certs.ca_cert)

    def flwr(
        self, *args: str, timeout: float = 120.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run ``flwr ARGS`` against this SuperLink (cwd ``out``, so no pyproject is ever migrated)."""
        cmd = [tool("flwr"), *args]
        proc = subprocess.run(
            cmd,
            cwd=self.out,
            env=flower_env(self.cli_home),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        with (self.out / "logs" / "flwr-cli.log").open("a", encoding="utf-8") as log:
            log.write(f"$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}[exit {proc.returncode}]\n")
        if check and proc.returncode != 0:
            raise DeployError(
                f"`flwr {' '.join(args)}` failed (exit {proc.returncode}): "
                f"{(proc.stderr or proc.stdout)[-800:]} -- see {self.out / 'logs'}."
            )
        return proc

    def flwr_json(self, *args: str, timeout: float = 120.0) -> dict[str, Any]:
        """``flwr ARGS --format json`` parsed."""
        out = self.flwr(*args, "--format", "json", timeout=timeout).stdout
        start = out.find("{")
        if start < 0:
            raise DeployError(f"`flwr {' '.join(args)}` printed no JSON: {out[-500:]}")
        return json.loads(out[start:])

    def start_superlink(self, timeout: float = 60.0) -> None:
        """``flower-superlink`` with TLS, SuperNode authentication and no per-run dependency installation."""
        cmd = [
            tool("flower-superlink"),
            "--ssl-ca-certfile", str(self.certs.ca_cert),
            "--ssl-certfile", str(self.certs.server_cert),
            "--ssl-keyfile", str(self.certs.server_key),
            "--enable-supernode-auth",
            "--disable-runtime-dependency-installation",
            "--host", HOST,
            "--port", str(self.port),
        ]  # fmt: skip
        env = flower_env(self.out / "flwr" / "superlink", threads=self.threads)
        self.procs.start("superlink", cmd, env=env, cwd=self.out)
        try:
            wait_for_port(HOST, self.port, timeout, alive=lambda: self.procs.alive("superlink"))
        except TimeoutError as err:
            raise DeployError(
                f"The SuperLink did not start ({err}); see {self.procs.log_path('superlink')}."
            ) from None

    def register(self, public_key: Path) -> int:
        """``flwr supernode register``: authorise a SuperNode's public key; return its node id."""
        return int(self.flwr_json("supernode", "register", str(public_key), CONNECTION)["node-id"])

    def start_supernode(self, name: str, private_key: Path, config: str) -> int:
        """Start ``flower-supernode`` over TLS, authenticated with ``private_key``; return its pid."""
        cmd = [
            tool("flower-supernode"),
            "--superlink", self.address,
            "--root-certificates", str(self.certs.ca_cert),
            "--auth-supernode-private-key", str(private_key),
            "--node-config", config,
            "--port", str(free_port()),  # the SuperNode's own Runtime API (its ClientApp processes)
            "--max-retries", "10",
        ]  # fmt: skip
        proc = self.procs.start(
            name, cmd, env=flower_env(self.out / "flwr" / name, threads=self.threads), cwd=self.out
        )
        return proc.pid

    def start_worker(self, name: str, socket_path: Path, timeout: float = 60.0) -> int:
        """Start ``fedtune site-worker`` on ``socket_path``; return its pid once it answers there.

        Raises
        ------
        DeployError
            It exited, or did not answer within ``timeout`` seconds (names its log).
        """
        cmd = [sys.executable, "-m", "fedtune.simulations.cli", "site-worker", "--socket", str(socket_path)]
        proc = self.procs.start(name, cmd, env=flower_env(self.out / "flwr" / name, threads=self.threads))
        deadline = time.monotonic() + timeout
        while not socket_path.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise DeployError(f"Site worker {name} did not start; see {self.procs.log_path(name)}.")
            time.sleep(0.1)
        return proc.pid

    def nodes(self) -> list[dict[str, Any]]:
        """``flwr supernode ls``: the registered SuperNodes and their status."""
        return list(self.flwr_json("supernode", "ls", CONNECTION).get("nodes", []))

    def wait_online(self, names: Sequence[str], node_ids: Sequence[int], timeout: float) -> None:
        """Block until every node in ``node_ids`` is online."""
        deadline = time.monotonic() + timeout
        wanted = {str(n) for n in node_ids}
        while True:
            for name in names:
                if not self.procs.alive(name):
                    raise DeployError(f"SuperNode {name} exited; see {self.procs.log_path(name)}.")
            online = {n["node-id"] for n in self.nodes() if n.get("status") == "online"}
            if wanted <= online:
                return
            if time.monotonic() > deadline:
                raise DeployError(
                    f"SuperNodes {sorted(wanted - online)} not online after {timeout:g} s; "
                    f"see {self.out / 'logs'}."
                )
            time.sleep(1.0)

    def run(self, app_dir: Path, run_config: Path) -> int:
        """``flwr run APP CONNECTION --run-config FILE``; return the run id."""
        return int(self.flwr_json("run", str(app_dir), CONNECTION, "--run-config", str(run_config))["run-id"])

    def status(self, run_id: int) -> dict[str, Any]:
        """``flwr ls --run-id``: the run's record (``status`` e.g. ``finished:completed``)."""
        runs = self.flwr_json("ls", CONNECTION, "--run-id", str(run_id)).get("runs", [])
        if not runs:
            raise DeployError(f"The SuperLink knows no run {run_id}.")
        return dict(runs[0])

    def wait_run(
        self, run_id: int, deadline: float, progress: Callable[[], None] | None = None
    ) -> dict[str, Any]:
        """Stream the run's log to ``logs/run.log`` until it ends (``flwr log`` returns); return its status.

        Raises
        ------
        DeployError
            The deadline passed (the run is stopped) or the SuperLink died.
        """
        for attempt in range(3):
            name = "run" if attempt == 0 else f"run-{attempt}"
            cmd = [tool("flwr"), "log", str(run_id), CONNECTION, "--stream"]
            self.procs.start(name, cmd, env=flower_env(self.cli_home), cwd=self.out)
            while self.procs.alive(name):
                if not self.procs.alive("superlink"):
                    raise DeployError(f"The SuperLink exited; see {self.procs.log_path('superlink')}.")
                if time.monotonic() > deadline:
                    self.flwr("stop", str(run_id), CONNECTION, check=False)
                    raise DeployError(
                        f"Run {run_id} did not finish in time (--timeout); stopped. See {self.out / 'logs'}."
                    )
                if progress is not None:
                    progress()
                time.sleep(1.0)
            self.procs.stop([name])
            record = self.status(run_id)
            if str(record.get("status", "")).startswith("finished"):
                return record
        raise DeployError(f"The log stream of run {run_id} kept ending early; see {self.out / 'logs'}.")
