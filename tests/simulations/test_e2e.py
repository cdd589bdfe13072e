"""End-to-end: real Flower simulations through the ``fedtune simulate`` CLI (run with ``--run-e2e``)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from fedtune.common.config import parse_run_config
from fedtune.common.privacy import compute_epsilon
from fedtune.common.sites import coordinator_test_set
from peft import PeftModel
from safetensors.numpy import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

pytestmark = pytest.mark.e2e

SMOKE = "num-server-rounds=2 max-examples=600 partitioning=iid local-epochs=1"  # mechanics, not quality


def simulate(out: Path, run_config: str, num_clients: int = 3) -> list[dict]:
    cmd = [
        sys.executable,
        "-m",
        "fedtune.simulations.cli",
        "simulate",
        "--num-clients",
        str(num_clients),
        "--out",
        str(out),
        "--run-config",
        run_config,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.parametrize(
    ("method", "extra"),
    [("lora", ""), ("prefix", ""), ("lora", "lora-variant=ffa")],
    ids=["lora", "prefix", "lora-ffa"],
)
def test_simulation_adapter_loads_with_plain_peft_and_scores_as_recorded(
    tmp_path: Path, method: str, extra: str
) -> None:
    # Prepare / Execute
    out = tmp_path / method
    records = simulate(out, f"{SMOKE} peft-method={method} {extra}")

    # Assert: one record per round (plus the initial adapter) with the promised fields
    assert [r["round"] for r in records] == [0, 1, 2]
    for r in records[1:]:
        for key in (
            "accuracy",
            "macro_f1",
            "sites_accuracy",
            "train_loss",
            "bytes_up",
            "bytes_down",
            "seconds",
        ):
            assert r[key] is not None and r[key] >= 0, key
        assert r["bytes_up"] > 0 and len(r["bytes_up_per_site"]) == 3
    # the adapter stays float32 under SecAgg+: later rounds download no more than the first
    assert records[2]["bytes_down"] <= 1.01 * records[1]["bytes_down"]
    assert (out / "run_config.json").is_file() and (out / "plots" / "quality.png").is_file()
    meta = json.loads((out / "adapter" / "fedtune.json").read_text())
    assert meta["peft_method"] == method and len(meta["base_model_fingerprint"]) == 64
    assert 0 < meta["trainable_percent"] < 1

    # Assert: plain transformers + peft (no fedtune) reproduce the recorded held-out accuracy
    accuracy, test_rows = _plain_peft_accuracy(out)
    assert abs(accuracy - records[-1]["accuracy"]) <= 1.0 / test_rows + 1e-9


def _plain_peft_accuracy(out: Path) -> tuple[float, int]:
    """``(accuracy, rows)`` of a run's shared adapter on its held-out set, loaded with plain peft."""
    meta = json.loads((out / "adapter" / "fedtune.json").read_text())
    base = AutoModelForSequenceClassification.from_pretrained(
        meta["base_model"], num_labels=len(meta["label_names"])
    )
    model = PeftModel.from_pretrained(base, out / "adapter").eval()
    tokenizer = AutoTokenizer.from_pretrained(meta["base_model"])
    test = coordinator_test_set(parse_run_config(json.loads((out / "run_config.json").read_text())))
    with torch.no_grad():
        enc = tokenizer(
            list(test.texts),
            truncation=True,
            max_length=meta["max_length"],
            padding=True,
            return_tensors="pt",
        )
        pred = model(**enc).logits.argmax(-1).numpy()
    return float((pred == test.labels).mean()), len(test)


def test_the_defaults_learn_at_once_under_label_skew_and_the_site_recipe_beyond_its_first_round(
    tmp_path: Path,
) -> None:
    # Prepare / Execute: the embedded defaults at 3 sites, 3 rounds, on a small Dirichlet(0.3) set; and
    # the same with the sites' averaged head (head-fit=none), which isolates what local training adds
    skewed = "num-server-rounds=3 max-examples=600 dirichlet-alpha=0.3 fraction-evaluate=0"
    f1 = [r["macro_f1"] for r in simulate(tmp_path / "defaults", skewed)]
    averaged = [r["macro_f1"] for r in simulate(tmp_path / "averaged", f"{skewed} head-fit=none")]

    # Assert: the solved head (head-fit=auto) is far above the untrained adapter from round 1 on, and
    # every round above the best the averaged head reached (measured: 0.36-0.45 vs at most 0.19)
    assert min(f1[1:]) > 4 * f1[0] and min(f1[1:]) >= max(averaged[1:]) + 0.1, (f1, averaged)
    # the sites' recipe (local steps, schedule, logit adjustment) learns clearly beyond its first round
    # (measured: 0.07 after round 1, 0.19 after round 3)
    assert averaged[3] >= averaged[1] + 0.05 and averaged[3] > 2 * averaged[0], averaged


def test_patient_level_dp_under_secagg_records_each_sites_epsilon_and_its_adapter_loads_with_plain_peft(
    tmp_path: Path,
) -> None:
    # Prepare / Execute: DP-SGD at 3 sites (sigma calibrated to epsilon 8 per patient), SecAgg+ on
    out = tmp_path / "example-dp"
    records = simulate(out, f"{SMOKE} dp-mode=example dp-example-target-epsilon=8 secure-aggregation=true")

    # Assert: each site's epsilon after each round, growing and at most the budget; privacy.json names them
    for r in records[1:]:
        assert sorted(r["sites_example_dp"]) == ["0", "1", "2"]
        assert 0 < r["example_dp_epsilon"] <= 8.0
    assert all(records[2]["sites_example_dp"][s]["epsilon"] > records[1]["sites_example_dp"][s]["epsilon"]
               for s in "012")  # fmt: skip
    privacy = json.loads((out / "privacy.json").read_text())
    assert privacy["dp_mode"] == "example" and set(privacy["example_dp"]["sites"]) == {"0", "1", "2"}

    # Assert: the adapter loads with plain transformers + peft and scores as recorded
    accuracy, test_rows = _plain_peft_accuracy(out)
    assert abs(accuracy - records[-1]["accuracy"]) <= 1.0 / test_rows + 1e-9


def test_secagg_aggregate_matches_plain_average_within_quantisation(tmp_path: Path) -> None:
    # Prepare: the same seeded round with and without SecAgg+, at 2 sites of more than 1,000 training
    # examples each (above Flower's default `max_weight`, which would clip their weights)
    # (head-fit=none: a head solved from SecAgg+-quantised statistics is checked in process instead)
    one_round = "num-server-rounds=1 max-examples=3200 partitioning=iid fraction-evaluate=0 max-length=24"
    one_round += " head-fit=none"
    masked = simulate(tmp_path / "secagg", f"{one_round} secure-aggregation=true", num_clients=2)
    plain = simulate(tmp_path / "plain", f"{one_round} secure-aggregation=false", num_clients=2)

    # Execute
    a = load_file(str(tmp_path / "secagg" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "plain" / "adapter" / "adapter_model.safetensors"))
    meta = json.loads((tmp_path / "secagg" / "adapter" / "fedtune.json").read_text())
    cfg = parse_run_config(json.loads((tmp_path / "secagg" / "run_config.json").read_text()))

    # Assert: every value within the SecAgg+ quantisation error bound, yet the upload was really masked
    sites = masked[1]["site_train_examples"]
    assert min(sites) > 1000 and sites == plain[1]["site_train_examples"]
    step = 2 * cfg.secagg_clipping_range / (cfg.secagg_quantization_range - 1)
    bound = len(sites) * step * meta["secagg_max_weight"] / sum(sites)  # one step per site, unweighted
    assert a.keys() == b.keys()
    max_err = max(float(np.abs(a[k] - b[k]).max()) for k in a)
    assert 0 < max_err <= bound, (max_err, bound)
    # uint32 masked vectors are the fp32 adapter's size; SecAgg+'s key material comes on top
    assert plain[1]["bytes_up"] < masked[1]["bytes_up"] <= 1.25 * plain[1]["bytes_up"]


def audit(out: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "fedtune.simulations.cli", "audit", str(out)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "audit" / "report.md").is_file()
    return json.loads((out / "audit" / "report.json").read_text())


def _upload_array_bytes(out: Path, prefix: str) -> int:
    total = 0
    for line in (out / "audit" / "server" / "wire.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["direction"] == "up":
            for t in r["tensors"]:
                if t["name"].startswith(prefix) and not t["name"].endswith("[0]"):
                    total += int(np.prod(t["shape"])) * np.dtype(t["dtype"]).itemsize
    return total


def test_audit_of_masked_and_clear_runs(tmp_path: Path) -> None:
    # Prepare: one round, 3 sites, with and without SecAgg+ (the adapter only: head-fit=none)
    run = "num-server-rounds=1 max-examples=600 partitioning=iid fraction-evaluate=0 local-epochs=1"
    run += " head-fit=none"
    simulate(tmp_path / "masked", f"{run} secure-aggregation=true")
    simulate(tmp_path / "clear", f"{run} secure-aggregation=false")

    # Execute
    masked, clear = audit(tmp_path / "masked"), audit(tmp_path / "clear")

    # Assert: only the adapter left, and both sides' records agree
    for report in (masked, clear):
        assert report["only_adapter_left_sites"] and report["site_and_server_records_agree"]
        assert report["sites_recorded"] == 3
        assert report["tensors_exchanged"]["up_ratio_to_full_model"] < 0.05
    # the wire record is complete: adapter bytes x rounds x sites (uint32 masked: the fp32 bytes)
    meta = json.loads((tmp_path / "clear" / "adapter" / "fedtune.json").read_text())
    assert _upload_array_bytes(tmp_path / "clear", "fitres.parameters") == meta["adapter_bytes"] * 1 * 3
    masked_bytes = _upload_array_bytes(tmp_path / "masked", "secaggplus_configs.masked_params")
    assert masked_bytes == meta["adapter_bytes"] * 3
    # the SecAgg check: green when masked, red in the clear
    assert masked["secagg"]["masked"] and masked["secagg"]["aggregate_within_bound"]
    assert not clear["secagg"]["masked"] and clear["secagg"]["max_abs_correlation"] > 0.99
    assert clear["secagg"]["aggregate_within_bound"]
    assert masked["integrity"] == clear["integrity"] == {"consistent": True, "mismatches": []}

    # Execute: tamper with the coordinator's record of one upload (its size)
    wire = tmp_path / "clear" / "audit" / "server" / "wire.jsonl"
    lines = wire.read_text().splitlines()
    ups = [
        (i, r) for i, r in enumerate(map(json.loads, lines)) if (r["direction"], r["kind"]) == ("up", "train")
    ]
    n, edited = ups[0]
    edited["payload_bytes"] += 64
    lines[n] = json.dumps(edited, sort_keys=True)
    wire.write_text("\n".join(lines) + "\n")
    proc = subprocess.run(
        [sys.executable, "-m", "fedtune.simulations.cli", "audit", str(tmp_path / "clear")],
        capture_output=True,
        text=True,
    )

    # Assert: exit 4, the site, round and both records named, the totals too
    assert proc.returncode == 4, proc.stderr[-2000:]
    assert "site and coordinator records agree: False" in proc.stdout
    assert f"(site node {edited['node']}, round {edited['round']}" in proc.stderr
    assert f"({wire}, line {n + 1}) in its payload_bytes" in proc.stderr
    assert "metrics.json, record 1 (round 1): bytes_up" in proc.stderr


def test_distributed_dp_run_is_accounted_and_its_empirical_epsilon_stays_below(tmp_path: Path) -> None:
    # Prepare / Execute: distributed DP under SecAgg+, canaries planted at site 0, and a budget that
    # a third round would exceed (epsilon after 2 rounds 7.08, after 3 rounds 8.9)
    out = tmp_path / "dp"
    records = simulate(
        out,
        "num-server-rounds=3 max-examples=600 partitioning=iid local-epochs=1 dp-mode=distributed "
        "dp-noise-multiplier=1.0 dp-clipping-norm=0.5 audit-canaries=200 dp-target-epsilon=7.5",
    )
    report = audit(out)

    # Assert: epsilon recorded per round, recomputable from privacy.json, never beaten by the audit
    privacy = json.loads((out / "privacy.json").read_text())
    assert [r["dp_epsilon"] > 0 for r in records[1:]] == [True, True]  # the budget stopped round 3
    assert "stopped before round 3" in privacy["stopped_early"] and privacy["epsilon"] <= 7.5
    assert json.loads((out / "adapter" / "fedtune.json").read_text())["rounds"] == 2
    assert (
        records[2]["dp_epsilon"]
        > records[1]["dp_epsilon"]
        == pytest.approx(compute_epsilon(noise_multiplier=1.0, sampling_rate=1.0, rounds=1, delta=1e-5))
    )
    assert privacy["epsilon"] == pytest.approx(records[2]["dp_epsilon"])
    mia = report["membership_inference"]
    assert mia["canaries"] == 200 and 0 <= mia["attack_auc"] <= 1
    assert report["empirical_epsilon"]["lower_bound"] <= report["empirical_epsilon"]["accountant_epsilon"]
    assert report["secagg"]["masked"] and report["only_adapter_left_sites"]


def test_a_killed_run_resumes_from_its_checkpoint_with_every_round_recorded_once(
    tmp_path: Path, kill_tree: Callable[[int], None]
) -> None:
    # Prepare: a 3-round FedAdam run (server optimiser state to carry over), killed once round 1 is recorded
    out = tmp_path / "run"
    cli = [sys.executable, "-m", "fedtune.simulations.cli", "simulate"]
    run_config = "num-server-rounds=3 max-examples=600 partitioning=iid local-epochs=1 strategy=fedadam "
    run_config += "fedopt-eta=0.01"
    first = subprocess.Popen(
        [*cli, "--num-clients", "3", "--out", str(out), "--run-config", run_config],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 600
    killed: list[dict] = []
    try:
        while not any(r["round"] >= 1 for r in killed):
            assert first.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "round 1 never finished"
            time.sleep(0.5)
            try:
                killed = json.loads((out / "metrics.json").read_text())
            except (OSError, ValueError):
                continue
    finally:
        kill_tree(first.pid)
    checkpointed = json.loads((out / "checkpoint" / "fedtune.json").read_text())["round"]
    assert not (out / "adapter").exists() and checkpointed == killed[-1]["round"] < 3

    # Execute: changing the config is refused (naming the key), an equal override is fine
    refused = subprocess.run(
        [*cli, "--resume", str(out), "--run-config", "fedopt-eta=0.1"], capture_output=True, text=True
    )
    resumed = subprocess.run(
        [*cli, "--resume", str(out), "--run-config", "strategy=fedadam"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    again = subprocess.run([*cli, "--resume", str(out)], capture_output=True, text=True)

    # Assert: rounds 1..3 recorded exactly once each, the records written before the kill unchanged
    assert refused.returncode == 2 and "`fedopt-eta` is 0.01" in refused.stderr, refused.stderr
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"Resuming after round {checkpointed}" in resumed.stdout
    records = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in records] == [0, 1, 2, 3]
    assert records[: checkpointed + 1] == killed[: checkpointed + 1]
    assert all(r["excluded_sites"] == {} and len(r["site_train_examples"]) == 3 for r in records[1:])
    assert again.returncode == 2 and "already finished" in again.stderr
    checks = json.loads((out / "base_model_distribution.json").read_text())  # the killed run's kept
    assert [c["before_round"] for c in checks] == [1] * 3 + [checkpointed + 1] * 3
    assert {c["status"] for c in checks} == {"had"}
    meta = json.loads((out / "adapter" / "fedtune.json").read_text())
    assert meta["rounds"] == 3 and json.loads((out / "checkpoint" / "fedtune.json").read_text())["round"] == 3

    # Assert: the final adapter loads with plain peft and scores as recorded
    accuracy, test_rows = _plain_peft_accuracy(out)
    assert abs(accuracy - records[-1]["accuracy"]) <= 1.0 / test_rows + 1e-9


POISONED_RUN = """
import json, sys
import numpy as np
from fedtune.client.base_model import make_base_model_mod
from fedtune.client.mods import secure_aggregation_mod
from fedtune.client.site import SiteClient
from fedtune.common import instructions
from fedtune.common.config import parse_run_config
from fedtune.common.site_config import SiteConfig
from fedtune.server.app import make_server_app
from flwr.app.message_type import MessageType
from flwr.clientapp import ClientApp
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.simulation import run_simulation

secure, out = sys.argv[1] == "true", sys.argv[2]
POISONED = {1: {0}, 2: {0, 1}}  # round -> partitions whose trained update turns NaN


def poison_mod(msg, ctxt, call_next):
    reply = call_next(msg, ctxt)
    if msg.metadata.message_type != MessageType.TRAIN or reply.has_error():
        return reply
    server_round = int(compat.recorddict_to_fitins(msg.content, True).config[instructions.ROUND])
    if int(ctxt.node_config["partition-id"]) in POISONED[server_round]:
        fitres = compat.recorddict_to_fitres(reply.content, keep_input=True)
        arrays = parameters_to_ndarrays(fitres.parameters)
        arrays[0] = np.full_like(arrays[0], np.nan)
        fitres.parameters = ndarrays_to_parameters(arrays)
        reply.content = compat.fitres_to_recorddict(fitres, keep_input=True)
    return reply


cfg = parse_run_config({
    "num-server-rounds": 2, "max-examples": 600, "partitioning": "iid", "audit": False, "local-epochs": 1,
    "fraction-evaluate": 0.0, "secure-aggregation": secure, "out-dir": out,
})
try:
    run_simulation(
        server_app=make_server_app(cfg.to_run_config(), show_progress=False),
        client_app=ClientApp(
            client_fn=lambda context: SiteClient(SiteConfig.parse(context.node_config)).to_client(),
            mods=[make_base_model_mod(), secure_aggregation_mod, poison_mod],
        ),
        num_supernodes=3,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
except RuntimeError as err:
    print("RUN FAILED:", err)
"""


@pytest.mark.parametrize("secure", [False, True])
def test_a_site_with_a_nan_update_is_left_out_and_too_few_sites_fail_the_round(
    tmp_path: Path, secure: bool
) -> None:
    # Prepare / Execute: site 0 sends NaN in round 1; sites 0 and 1 in round 2
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-c", POISONED_RUN, str(secure).lower(), str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    log = proc.stdout + proc.stderr
    records = json.loads((out / "metrics.json").read_text())

    # Assert: round 1 aggregates the two good sites and names the third
    assert proc.returncode == 0, log[-4000:]
    ((node, reason),) = records[1]["excluded_sites"].items()
    assert len(records[1]["site_train_examples"]) == 2 and records[1]["accuracy"] is not None
    if secure:  # the site refused to mask its own update and dropped out; SecAgg+ unmasked the others
        assert reason.startswith("dropped out:") and "refuses to mask its update" in reason, reason
        assert "non-finite" in reason
    else:  # the coordinator saw the NaN and left the update out
        assert reason == "invalid update: tensor 0 holds non-finite values (NaN/Inf)"
        assert f"site node {node} is left out of the aggregate" in log
    if secure:
        # Assert: round 2 loses two of three sites, below SecAgg+'s threshold: it fails, round 1 stays
        assert [r["round"] for r in records] == [0, 1]
        assert "RUN FAILED: Round 2 produced no aggregate: SecAgg+ could not unmask the sum" in log, log[
            -4000:
        ]
        assert "The last good adapter (round 1)" in log
        assert json.loads((out / "checkpoint" / "fedtune.json").read_text())["round"] == 1
        assert not (out / "adapter").exists()
    else:
        # Assert: round 2 goes on with the one good site
        assert [r["round"] for r in records] == [0, 1, 2]
        assert len(records[2]["excluded_sites"]) == 2 and len(records[2]["site_train_examples"]) == 1
        assert json.loads((out / "adapter" / "fedtune.json").read_text())["rounds"] == 2


def test_the_llm_preset_federates_smollm2_and_its_adapter_generates_with_plain_peft(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    # Execute: the preset as a user runs it (SmolLM2 fetched into the model cache on first use), cut short
    out = tmp_path / "llm"
    overrides = "num-server-rounds=1 local-steps=2 max-examples=120 min-clients=2"
    cmd = [
        sys.executable,
        "-m",
        "fedtune.simulations.cli",
        "simulate",
        "--preset",
        "llm",
        "--num-clients",
        "2",
    ]
    proc = subprocess.run(
        [*cmd, "--out", str(out), "--run-config", overrides], capture_output=True, text=True, timeout=1800
    )

    # Assert: generated answers scored every round; the upload is the adapter, under 1% of the model
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in records] == [0, 1]
    assert {"exact_match", "category_match", "valid_code", "loss"} <= set(records[-1])
    meta = json.loads((out / "adapter" / "fedtune.json").read_text())
    assert max(records[-1]["bytes_up_per_site"].values()) <= 0.01 * meta["base_model_bytes"]
    assert meta["task"] == "icd10-code" and "{text}" in meta["prompt_template"]

    # Assert: plain transformers + peft load the adapter on the causal LM, and it generates an answer
    base = AutoModelForCausalLM.from_pretrained(meta["base_model"])
    model = PeftModel.from_pretrained(base, out / "adapter").eval()
    tokenizer = AutoTokenizer.from_pretrained(meta["base_model"])
    prompt = meta["prompt_template"].replace("{text}", "Type 2 diabetes mellitus without complications")
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(**ids, max_new_tokens=meta["max_new_tokens"], do_sample=False)
    answer = tokenizer.decode(generated[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert answer.strip()
