"""``fedtune deploy-local``: a real Flower deployment on this machine's loopback interface.

One ``flower-superlink`` and one ``flower-supernode`` per site run as separate processes, with
TLS (certificates from :mod:`fedtune.server.certs`) and SuperNode authentication on: the
SuperLink accepts only the SuperNodes whose public keys were registered with
``flwr supernode register``. ``flwr run`` submits this repository's Flower app (a copy of its
``pyproject.toml`` under ``OUT/app``); the SuperLink and SuperNodes load it from the installed
``fedtune`` package: nothing is installed per run (``--disable-runtime-dependency-installation``
on the SuperLink; SuperNodes install nothing unless given ``--allow-runtime-dependency-installation``).
``flwr log --stream`` ends when the run has finished; ``flwr ls`` then gives its status.

Each site's file reaches only its own SuperNode (node config ``data-path``); the coordinator gets
``test-data-path``, the label names and the SecAgg+ weight bound, never a site's rows or path.
Every process runs in its own session and is stopped with its whole process tree (SIGTERM, then
SIGKILL) on success, failure, Ctrl-C, SIGTERM or interpreter exit.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli
import tomli_w
from fedtune.common.checkpoint import read_checkpoint, resume_config
from fedtune.common.config import ConfigError, FedConfig, key_of, parse_run_config
from fedtune.common.data import DataError, check_label_values, file_labels
from fedtune.common.files import write_json_atomic
from fedtune.common.preflight import PreflightError, check_base_model, check_site_file
from fedtune.common.records import RoundRecord, read_records
from fedtune.common.run_folder import RunFolder, holds_run, outputs_discarded_on_failure
from fedtune.common.sites import coordinator_test_set
from fedtune.server.certs import CertFiles, make_certs

from .processes import HOST, ProcessGroup, free_port, wait_for_port

CONNECTION = "fedtune-local"  # name of the SuperLink connection in OUT/flwr/cli/config.toml
_QUIET_FLOWER = {
    "FLWR_TELEMETRY_ENABLED": "0",  # no network: no telemetry events ...
    "FLWR_DISABLE_UPDATE_CHECK": "1",  # ... and no update check
    "TRANSFORMERS_VERBOSITY": "error",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",
}


class DeployError(RuntimeError):
    """A deployment step failed; the message names the step, the log to read and the fix."""


class DeployInputError(DeployError):
    """The deployment was refused before anything started: bad sites' files, config or folders."""


def tool(name: str) -> str:
    """Path of a Flower console script of this environment (``flwr``, ``flower-superlink`` ...)."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    if not found:
        raise DeployError(f"`{name}` not found beside {sys.executable} nor on PATH; `pip install flwr`.")
    return found


def flower_env(
    flwr_home: Path, base: Mapping[str, str] | None = None, threads: int | None = None
) -> dict[str, str]:
    """Environment of a Flower process: its own ``FLWR_HOME``, this environment's scripts first on PATH.

    ``threads`` caps the CPU threads of torch/BLAS (``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``) unless
    already set: sites sharing one machine would otherwise oversubscribe its cores.
    """
    env = dict(os.environ if base is None else base)
    for key, value in _QUIET_FLOWER.items():
        env.setdefault(key, value)
    if threads:
        env.setdefault("OMP_NUM_THREADS", str(threads))
        env.setdefault("MKL_NUM_THREADS", str(threads))
    env["FLWR_HOME"] = str(flwr_home)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


# --- files the deployment needs -------------------------------------------------------------------------
def repo_pyproject() -> Path:
    """The fedtune checkout's ``pyproject.toml`` (the Flower app; fedtune is installed editable)."""
    path = Path(__file__).resolve().parents[1] / "pyproject.toml"
    if not path.is_file():
        raise DeployError(
            f"{path} not found: deploy-local submits the fedtune Flower app from its source checkout; "
            "install it with `pip install -e .`."
        )
    return path


def write_app(app_dir: Path, pyproject: Path | None = None) -> Path:
    """Copy the app's ``pyproject.toml`` to ``app_dir`` without ``[tool.flwr.federations]``.

    ``flwr run`` 1.42 moves a ``[tool.flwr.federations]`` table into the Flower config and comments it
    out in place: on a copy, the repository's file is never rewritten.
    """
    source = pyproject or repo_pyproject()
    kept: list[str] = []
    dropping = False
    for line in source.read_text(encoding="utf-8").splitlines(keepends=True):
        header = re.match(r"\s*\[+\s*([^\]]+?)\s*\]", line)
        if header:
            dropping = header.group(1).startswith("tool.flwr.federations")
        if not dropping:
            kept.append(line)
    text = "".join(kept)
    config = tomli.loads(text)
    if "components" not in config.get("tool", {}).get("flwr", {}).get("app", {}):
        raise DeployError(f"{source} has no [tool.flwr.app.components]: it is not a Flower app.")
    app_dir.mkdir(parents=True, exist_ok=True)
    (app_dir / "pyproject.toml").write_text(text, encoding="utf-8")
    return app_dir


def write_connection(flwr_home: Path, address: str, root_certificates: Path) -> Path:
    """Write the Flower config of ``flwr`` (1.42: ``$FLWR_HOME/config.toml``) naming the TLS SuperLink."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    config = {
        "superlink": {
            "default": CONNECTION,
            CONNECTION: {"address": address, "root-certificates": str(root_certificates.resolve())},
        }
    }
    path.write_text(tomli_w.dumps(config), encoding="utf-8")
    return path


def node_config(**values: str | Path) -> str:
    """``--node-config`` text: ``key='value'`` pairs (TOML literal strings, kebab-case keys).

    Raises
    ------
    DeployError
        A value contains a single quote or a line break (Flower's parser cannot carry it).
    """
    items = []
    for key, value in values.items():
        text = str(value)
        if "'" in text or "\n" in text:
            raise DeployError(
                f"Node config `{key_of(key)}` {text!r} contains a quote or line break; rename it."
            )
        items.append(f"{key_of(key)}='{text}'")
    return " ".join(items)


@dataclass(frozen=True)
class SiteSummary:
    """What the operator tells the coordinator about the sites' files: counts and label names, no rows."""

    rows: int
    labels: tuple[str, ...]


def summarise_sites(paths: Sequence[Path], label_column: str) -> SiteSummary:
    """Total data rows of the site files (CSV or JSONL) and the sorted union of their labels.

    Read by the sites' own rules (:func:`~fedtune.common.data.file_labels`).

    Raises
    ------
    DeployError
        A file is missing or unparsable or has no ``label_column`` (the message names the file and
        line), or the labels look like free text (:func:`~fedtune.common.data.check_label_values`).
    """
    rows = 0
    labels: set[str] = set()
    try:
        for path in paths:
            if not path.is_file():
                raise DeployInputError(f"Site file {path} not found; check `--site-data`.")
            n, names = file_labels(path, label_column)
            rows += n
            labels.update(names)
        check_label_values("the --site-data files", label_column, sorted(labels))
    except DataError as err:
        raise DeployInputError(str(err)) from None
    return SiteSummary(rows=rows, labels=tuple(sorted(labels)))


def deployment_run_config(
    overrides: Mapping[str, Any],
    site_files: Sequence[Path],
    out_dir: Path,
    test_data: Path | None = None,
) -> dict[str, Any]:
    """The run config ``flwr run`` sends: ``overrides``, ``task=csv``, ``out-dir``, the coordinator's facts.

    ``secagg-max-weight`` defaults to the sites' total rows (a bound on any site's weight),
    ``labels`` to the sorted union of their labels, ``test-data-path`` to ``test_data``; a relative
    ``base-model`` is made absolute (the ServerApp runs in another folder).

    Raises
    ------
    DeployError
        ``data-path`` given (a site's file is its own), another task, no held-out test file, or a
        config error (unknown key, bad value).
    """
    if key_of("data_path") in overrides:
        raise DeployInputError(
            "`data-path` is a site's own file and never goes to the coordinator: give the sites' files "
            "with --site-data."
        )
    config: dict[str, Any] = {"task": "csv", **overrides, key_of("out_dir"): str(out_dir)}
    if test_data is not None:
        if not test_data.is_file():
            raise DeployInputError(f"--test-data {test_data} not found.")
        config[key_of("test_data_path")] = str(test_data.resolve())
    base_model = str(config.get(key_of("base_model"), "")).strip()
    if base_model:  # the ServerApp runs in another folder: a path relative to here must stay valid
        config[key_of("base_model")] = str(Path(base_model).expanduser().resolve())
    if not str(config.get(key_of("test_data_path"), "")).strip():
        raise DeployInputError(
            "The coordinator needs a held-out file to score the shared adapter: give --test-data FILE."
        )
    if str(config["task"]).strip() != "csv":
        raise DeployInputError(
            f"deploy-local trains on the sites' files: `task` must be csv, got {config['task']!r}."
        )
    try:
        cfg = parse_run_config(config)
    except ConfigError as err:
        raise DeployInputError(f"--run-config: {err}") from None
    summary = summarise_sites(site_files, cfg.label_column)
    if cfg.secagg_max_weight <= 0:
        config[key_of("secagg_max_weight")] = float(summary.rows)
    if not cfg.label_names:
        config[key_of("labels")] = ",".join(summary.labels)
    cfg = parse_run_config(config)
    _preflight(cfg, site_files)
    typed = cfg.to_run_config()
    return {key: typed[key] for key in config}


def _preflight(cfg: FedConfig, site_files: Sequence[Path]) -> None:
    """Every site's file, the held-out file and the base model checked as the run will read them.

    Raises
    ------
    DeployError
        The first problem found (names the file, line and column, or the key), before any process starts.
    """
    try:
        check_base_model(cfg)
        for path in site_files:
            check_site_file(cfg, path)
        coordinator_test_set(cfg)
    except (PreflightError, DataError) as err:
        raise DeployInputError(str(err)) from None


# --- the deployment -------------------------------------------------------------------------------------
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


def rounds_so_far(out: Path) -> list[RoundRecord]:
    """The round records the run in ``out`` has written so far (none before its first round)."""
    metrics = RunFolder(out).metrics
    return read_records(metrics) if metrics.is_file() else []


def deploy_local(
    site_data: Sequence[str | Path],
    out: str | Path,
    run_config: Mapping[str, Any] | None = None,
    *,
    test_data: str | Path | None = None,
    timeout: float = 1800.0,
    echo: Callable[[str], None] = print,
    resume: bool = False,
) -> dict[str, Any]:
    """Run the fedtune app on a local TLS + SuperNode-auth deployment, one SuperNode per site file.

    Parameters
    ----------
    site_data
        One private CSV/JSONL file per site; site ``i`` reads only ``site_data[i]``.
    out
        Output folder: the ServerApp's outputs (``adapter/``, ``metrics.json``, ``audit/``), plus
        ``certs/``, ``app/``, ``flwr/``, ``logs/`` and ``deployment.json``.
    run_config
        Run-config overrides (kebab-case keys).
    test_data
        The coordinator's held-out file (``test-data-path``).
    timeout
        Seconds for the whole deployment, start-up included; the run is stopped after it.
    echo
        Where progress lines go.
    resume
        Continue the killed run in ``out`` after its last checkpoint, with its ``run_config.json``
        (``run_config`` and ``test_data``, when given, must equal it); certificates and keys are reused.

    Returns
    -------
    dict
        The summary also written to ``out/deployment.json``.

    Raises
    ------
    DeployError
        A step failed (the message names the log to read).
    """
    start = time.monotonic()
    deadline = start + timeout
    out_dir = Path(out).resolve()
    files = [Path(p).resolve() for p in site_data]
    if len(files) < 2:
        raise DeployInputError(
            "deploy-local needs at least 2 sites (SecAgg+ needs 2): give 2+ files to --site-data."
        )
    resumed_after = 0
    if resume:
        given = dict(run_config or {})
        if test_data is not None:
            given[key_of("test_data_path")] = str(Path(test_data).resolve())
        try:
            config = dict(resume_config(out_dir, given).to_run_config())
            resumed_after = read_checkpoint(out_dir).server_round
        except (ConfigError, FileNotFoundError, ValueError) as err:
            raise DeployInputError(f"--resume: {err}") from None
    elif holds_run(out_dir):
        raise DeployInputError(
            f"--out {out_dir} already holds a run; choose another folder, or add --resume."
        )
    else:
        config = deployment_run_config(
            run_config or {}, files, out_dir, Path(test_data) if test_data else None
        )
    min_clients = int(config.get(key_of("min_clients"), FedConfig.min_clients))
    if min_clients > len(files):
        raise DeployInputError(
            f"`min-clients` {min_clients} exceeds the {len(files)} sites given with --site-data."
        )
    (out_dir / "logs").mkdir(parents=True, exist_ok=True)
    certs = CertFiles(out_dir / "certs", len(files))
    if not all(p.exists() for p in certs.all_files()):
        certs = make_certs(certs.root, sites=len(files))
    app_dir = write_app(out_dir / "app")
    config_file = out_dir / ("run-config-resume.toml" if resume else "run-config.toml")
    config_file.write_text(tomli_w.dumps(config), encoding="utf-8")
    summary: dict[str, Any] = {
        "sites": [],
        "run_config": str(config_file),
        "resumed_after_round": resumed_after,
    }

    def write_summary() -> None:
        write_json_atomic(out_dir / "deployment.json", summary)

    # a failure before the first checkpoint leaves the logs, never a folder that looks like a run
    with outputs_discarded_on_failure(out_dir):
        with ProcessGroup(out_dir / "logs") as procs:
            # one machine hosts every site: share its cores instead of oversubscribing them
            dep = LocalDeployment(out_dir, certs, procs, threads=max(1, (os.cpu_count() or 1) // len(files)))
            summary["superlink"] = dep.address
            dep.start_superlink(timeout=max(1.0, min(60.0, deadline - time.monotonic())))
            echo(
                f"SuperLink on https://{dep.address} (TLS, SuperNode authentication on); "
                f"logs in {out_dir / 'logs'}"
            )
            write_summary()
            names, node_ids = [], []
            for i, path in enumerate(files):
                node_id = dep.register(certs.site_pub(i))
                name = f"site-{i}"
                pid = dep.start_supernode(
                    name,
                    certs.site_key(i),
                    # each site keeps a model cache of its own, as on its own machine
                    node_config(
                        data_path=path,
                        audit_dir=RunFolder(out_dir).audit,
                        model_cache_dir=out_dir / "models" / name,
                    ),
                )
                names.append(name)
                node_ids.append(node_id)
                summary["sites"].append(
                    {"site": i, "node_id": str(node_id), "pid": pid, "log": str(procs.log_path(name))}
                )
            write_summary()
            dep.wait_online(names, node_ids, timeout=max(1.0, min(120.0, deadline - time.monotonic())))
            echo(f"{len(files)} SuperNodes registered and online: {', '.join(map(str, node_ids))}")
            run_id = dep.run(app_dir, config_file)
            summary["run_id"] = str(run_id)
            write_summary()
            echo(f"Run {run_id} started; ServerApp log: {procs.log_path('run')}")
            rounds_seen = [resumed_after]

            def progress() -> None:
                for r in rounds_so_far(out_dir)[1:]:
                    if r.round > rounds_seen[0]:
                        rounds_seen[0] = r.round
                        accuracy = float("nan") if r.accuracy is None else r.accuracy
                        loss = float("nan") if r.train_loss is None else r.train_loss
                        echo(
                            f"round {r.round}: accuracy {accuracy:.4f}  train loss {loss:.4f}  "
                            f"{r.seconds:.0f} s"
                        )

            record = dep.wait_run(run_id, deadline, progress)
            progress()
            summary.update(
                status=record.get("status"), details=record.get("status-details"), nodes=dep.nodes()
            )
            summary["seconds"] = time.monotonic() - start
            write_summary()
        if summary["status"] != "finished:completed":
            raise DeployError(
                f"Run {run_id} ended {summary['status']}: {summary['details']}; "
                f"see {out_dir / 'logs' / 'run.log'}."
            )
        run = RunFolder(out_dir)
        if not run.adapter_weights.is_file():
            raise DeployError(
                f"Run {run_id} completed without writing {run.adapter}; see {out_dir / 'logs'}."
            )
    echo(
        f"Finished in {summary['seconds']:.0f} s. Shared adapter: {run.adapter}  "
        f"metrics: {run.metrics}  audit: {run.audit}"
    )
    return summary
