"""``fedtune deploy-local``: a real Flower deployment on this machine's loopback interface.

One ``flower-superlink`` and one ``flower-supernode`` per site run as separate processes, with
TLS (certificates from :mod:`fedtune.simulations.deploy.certs`) and SuperNode authentication on: the
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

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import tomli_w
from fedtune.common.checkpoint import read_checkpoint, resume_config
from fedtune.common.config import ConfigError, FedConfig, key_of
from fedtune.common.files import write_json_atomic
from fedtune.common.records import RoundRecord, read_records
from fedtune.common.run_folder import RunFolder, holds_run, outputs_discarded_on_failure
from fedtune.common.site_config import SiteConfig

from .certs import CertFiles, make_certs
from .flower import DeployError, DeployInputError, node_config, write_app
from .inputs import deployment_run_config
from .processes import ProcessGroup
from .superlink import LocalDeployment


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
    site_workers: bool = True,
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
    site_workers
        Start a ``fedtune site-worker`` beside each SuperNode (node config ``worker-socket``), which
        keeps the site's model loaded across messages; ``False``: every message loads it afresh.

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
    config, resumed_after = _run_config(files, out_dir, run_config or {}, test_data, resume)
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
    with outputs_discarded_on_failure(out_dir), _socket_dir() as sockets:
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
            summary["sites"] = _start_sites(dep, certs, files, out_dir, sockets if site_workers else None)
            write_summary()
            names, node_ids = (
                [f"site-{i}" for i in range(len(files))],
                [int(x["node_id"]) for x in summary["sites"]],
            )
            dep.wait_online(names, node_ids, timeout=max(1.0, min(120.0, deadline - time.monotonic())))
            echo(f"{len(files)} SuperNodes registered and online: {', '.join(map(str, node_ids))}")
            run_id = dep.run(app_dir, config_file)
            summary["run_id"] = str(run_id)
            write_summary()
            echo(f"Run {run_id} started; ServerApp log: {procs.log_path('run')}")
            show_rounds = _round_printer(out_dir, resumed_after, echo)
            record = dep.wait_run(run_id, deadline, show_rounds)
            show_rounds()  # the last round, written as the stream ended
            summary.update(
                status=record.get("status"), details=record.get("status-details"), nodes=dep.nodes()
            )
            summary["seconds"] = time.monotonic() - start
            write_summary()
        run = _check_finished(out_dir, run_id, summary)
    echo(
        f"Finished in {summary['seconds']:.0f} s. Shared adapter: {run.adapter}  "
        f"metrics: {run.metrics}  audit: {run.audit}"
    )
    return summary


def _run_config(
    files: Sequence[Path],
    out_dir: Path,
    overrides: Mapping[str, Any],
    test_data: str | Path | None,
    resume: bool,
) -> tuple[dict[str, Any], int]:
    """The run config ``flwr run`` sends and the round a resumed run continues after (0 for a new run).

    Raises
    ------
    DeployInputError
        Fewer than 2 sites, a run already in ``out_dir`` (without ``resume``), a resume that does
        not match the saved run, or ``min-clients`` above the number of sites.
    """
    if len(files) < 2:
        raise DeployInputError(
            "deploy-local needs at least 2 sites (SecAgg+ needs 2): give 2+ files to --site-data."
        )
    resumed_after = 0
    if resume:
        given = dict(overrides)
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
        config = deployment_run_config(overrides, files, out_dir, Path(test_data) if test_data else None)
    min_clients = int(config.get(key_of("min_clients"), FedConfig.min_clients))
    if min_clients > len(files):
        raise DeployInputError(
            f"`min-clients` {min_clients} exceeds the {len(files)} sites given with --site-data."
        )
    return config, resumed_after


@contextlib.contextmanager
def _socket_dir() -> Iterator[Path]:
    """A private (0700) folder for the site workers' sockets, short enough for Unix socket paths."""
    folder = Path(tempfile.mkdtemp(prefix="fedtune-sites-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _start_sites(
    dep: LocalDeployment, certs: CertFiles, files: Sequence[Path], out_dir: Path, sockets: Path | None
) -> list[dict[str, Any]]:
    """Register each site's key and start its SuperNode on its own file; one summary entry per site.

    With ``sockets``, each site's worker (``fedtune site-worker``) is started first, answering on
    ``sockets/site-<i>.sock``, and the SuperNode's node config names it.
    """
    sites = []
    for i, path in enumerate(files):
        node_id = dep.register(certs.site_pub(i))
        name = f"site-{i}"
        socket_path = sockets / f"{name}.sock" if sockets else None
        worker = dep.start_worker(f"worker-{i}", socket_path) if socket_path is not None else None
        pid = dep.start_supernode(
            name,
            certs.site_key(i),
            # each site keeps a model cache of its own, as on its own machine
            node_config(
                SiteConfig(
                    data_path=str(path),
                    audit_dir=str(RunFolder(out_dir).audit),
                    model_cache_dir=str(out_dir / "models" / name),
                    worker_socket=str(socket_path or ""),
                )
            ),
        )
        entry = {"site": i, "node_id": str(node_id), "pid": pid, "log": str(dep.procs.log_path(name))}
        if worker is not None:
            entry |= {"worker_pid": worker, "worker_log": str(dep.procs.log_path(f"worker-{i}"))}
        sites.append(entry)
    return sites


def _round_printer(out_dir: Path, resumed_after: int, echo: Callable[[str], None]) -> Callable[[], None]:
    """A callback that echoes each round the run in ``out_dir`` finished since the last call."""
    seen = [resumed_after]

    def show_new_rounds() -> None:
        for r in rounds_so_far(out_dir)[1:]:
            if r.round > seen[0]:
                seen[0] = r.round
                accuracy = float("nan") if r.accuracy is None else r.accuracy
                loss = float("nan") if r.train_loss is None else r.train_loss
                echo(f"round {r.round}: accuracy {accuracy:.4f}  train loss {loss:.4f}  {r.seconds:.0f} s")

    return show_new_rounds


def _check_finished(out_dir: Path, run_id: int, summary: Mapping[str, Any]) -> RunFolder:
    """The run's folder once Flower reports it completed and its adapter is written.

    Raises
    ------
    DeployError
        The run ended otherwise, or wrote no adapter (names the log to read).
    """
    if summary["status"] != "finished:completed":
        raise DeployError(
            f"Run {run_id} ended {summary['status']}: {summary['details']}; "
            f"see {out_dir / 'logs' / 'run.log'}."
        )
    run = RunFolder(out_dir)
    if not run.adapter_weights.is_file():
        raise DeployError(f"Run {run_id} completed without writing {run.adapter}; see {out_dir / 'logs'}.")
    return run
