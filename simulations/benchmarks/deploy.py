"""``fedtune bench deploy``: a real deployment vs a simulation of the same run, and base-model distribution.

Arms (same site files, same run config, same seed)
    simulation
        ``fedtune simulate``-style run (Flower's simulation engine, Ray) in which simulated site ``i``
        reads ``site-i.csv`` (:func:`fedtune.simulations.benchmarks.diabetes.federate_site_files`).
    deployment, sites have the model
        ``fedtune deploy-local``: a SuperLink and one SuperNode per site as separate processes over
        TLS with SuperNode authentication; the sites hold the packaged base model, so the coordinator
        only checks them (one status message each).
    deployment, sites lack the model
        The same deployment, but the coordinator pins a base model no site has: the packaged
        all-MiniLM-L6-v2 with one tensor nudged (same size, another fingerprint), standing in for a
        consortium's domain-adapted base. Before round 1 each site receives it over Flower messages
        (chunks of ``base-model-chunk-mb``), verifies the fingerprint and caches it.

Data: the Pima table split over the hospitals by age, as in ``fedtune bench diabetes``.

Figures: seconds per round (round 1, which holds the one-off start-up and the transfer, apart from
the mean of the later rounds), the transfer's bytes and seconds per site
(``base_model_distribution.json``), and the ratio of deployed to simulated round time.

Full: 3 hospitals, 3 rounds (~15 min on 2 CPU cores). Quick: 2 hospitals, 1 round (~5 min).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from fedtune.common.records import RoundRecord, read_records
from fedtune.common.run_folder import RunFolder

from .arms import work_dir
from .diabetes import federate_site_files, run_config, write_site_files
from .figures import new_figure, save_figure
from .harness import console
from .spec import Benchmark, Outcome
from .stats import mean_over_rounds, per_site_mean

NAME = "deploy"
COLUMNS = (
    "arm",
    "round_1_seconds",
    "later_round_seconds",
    "round_time_vs_simulation",
    "total_seconds",
    "sites_had_model",
    "sites_received_model",
    "transfer_bytes_per_site",
    "transfer_seconds",
    "auc",
)


def settings(quick: bool) -> dict[str, Any]:
    """Hospitals, rounds and local training of the full or quick mode."""
    if quick:
        return {"sites": 2, "rounds": 1, "local_epochs": 1, "batch_size": 16}
    return {"sites": 3, "rounds": 3, "local_epochs": 1, "batch_size": 16}


def nudged_base_model(folder: Path) -> Path:
    """The packaged base model with one tensor changed by 1e-4: same size, another fingerprint."""
    import torch
    from fedtune.common.base_files import packaged_model_dir
    from fedtune.common.model import checkpoint_tensors
    from safetensors.torch import save_file

    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(packaged_model_dir(), folder)
    tensors = checkpoint_tensors(folder)
    first = sorted(tensors)[0]
    tensors[first] = tensors[first] + torch.full_like(tensors[first], 1e-4)
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "model.safetensors")
    return folder


def _round_times(records: list[RoundRecord]) -> tuple[float, float | None]:
    """``(round 1 seconds, mean seconds of the later rounds or None)``."""
    rounds = [r.seconds for r in records[1:]]
    return rounds[0], (float(np.mean(rounds[1:])) if len(rounds) > 1 else None)


def _row(arm: str, records: list[RoundRecord], seconds: float, out: Path) -> dict[str, Any]:
    first, later = _round_times(records)
    row: dict[str, Any] = {
        "arm": arm,
        "round_1_seconds": first,
        "later_round_seconds": later,
        "total_seconds": seconds,
        "auc": records[-1].auc,
        "adapter_bytes_down_per_site_round": mean_over_rounds(
            records, lambda r: per_site_mean(r, "bytes_down_per_site")
        ),
    }
    transfers_file = RunFolder(out).distribution
    if transfers_file.is_file():
        transfers = json.loads(transfers_file.read_text())
        row["sites_received_model"] = sum(t["status"] == "received" for t in transfers)
        row["sites_had_model"] = sum(t["status"] == "had" for t in transfers)
        received = [t for t in transfers if t["status"] == "received"]
        if received:
            row["transfer_bytes_per_site"] = float(np.mean([t["bytes_down"] for t in received]))
            row["transfer_seconds"] = max(t["seconds"] for t in received)
    return row


def measure(s: dict[str, Any]) -> Outcome:
    """The simulation, then a TLS deployment whose sites have the base model, then one whose sites lack it."""
    from fedtune.common.base_files import fingerprint
    from fedtune.common.model import base_model_nbytes

    from ..deploy.local import deploy_local

    work = work_dir(NAME)
    files = write_site_files(work / "data", s["sites"])
    # the deployed coordinator gets no site data: counts and labels come with the config
    rc = {k: v for k, v in run_config(files, s, s["sites"]).items() if k != "data-path"}
    site_files = [x["path"] for x in files["sites"]]
    nudged = nudged_base_model(work / "consortium-model")

    rows = []
    console.print("[bold]arm 1/3[/bold]: simulation")
    sim_out = work / "simulation"
    sim = federate_site_files(sim_out, work / "data", s["sites"], rc)
    rows.append(_row("simulation", sim.records, sim.seconds, sim_out))
    for label, base in (("deployment, sites have the model", ""), ("deployment, sites lack it", str(nudged))):
        console.print(f"[bold]arm {len(rows) + 1}/3[/bold]: {label}")
        out = work / ("deploy-lack" if base else "deploy-have")
        shutil.rmtree(out, ignore_errors=True)
        summary = deploy_local(site_files, out, {**rc, "base-model": base}, timeout=3600, echo=console.print)
        rows.append(_row(label, read_records(RunFolder(out).metrics), summary["seconds"], out))
    sim_later = rows[0]["later_round_seconds"] or rows[0]["round_1_seconds"]
    for row in rows:
        row["round_time_vs_simulation"] = (row["later_round_seconds"] or row["round_1_seconds"]) / sim_later
    full = base_model_nbytes(nudged)
    lack = rows[2]
    notes = [
        f"{s['sites']} hospitals (Pima split by age), {s['rounds']} round(s) x {s['local_epochs']} local "
        f"epoch, batch {s['batch_size']}, SecAgg+, `fraction-evaluate=0`; same site files and config in "
        "every arm. Round time vs simulation compares the later rounds (round 1 when there is only one).",
        f"Base-model transfer: {lack.get('transfer_bytes_per_site', 0):,.0f} bytes per site "
        f"(checkpoint tensors {full:,} B + config/tokenizer files + message keys) in "
        f"{lack.get('transfer_seconds', 0):.1f} s to {lack.get('sites_received_model', 0)} sites at once; "
        f"= {lack.get('transfer_bytes_per_site', 0) / lack['adapter_bytes_down_per_site_round']:.0f} rounds "
        "of the adapter's per-site download. Every site verified the fingerprint "
        f"({fingerprint(nudged)[:16]}...) before caching it.",
        "A deployed SuperNode starts a fresh ClientApp process for every message (Flower's process "
        "isolation), which imports torch and loads the base model and the site's data each time; the "
        "simulation keeps them in long-lived Ray actors.",
    ]
    return Outcome(rows, notes, {"run_config": rc, "base_model_bytes": full})


def _plot(outcome: Outcome, s: dict[str, Any]) -> None:
    rows = outcome.rows
    fig, ax = new_figure(7, 3.5)
    y = np.arange(len(rows))[::-1]
    first = [r["round_1_seconds"] for r in rows]
    later = [r["later_round_seconds"] or 0.0 for r in rows]
    ax.barh(y + 0.2, first, 0.4, label="round 1 (start-up, base-model check or transfer)")
    ax.barh(y - 0.2, later, 0.4, label="later rounds (mean)")
    ax.set_yticks(y, [r["arm"] for r in rows], fontsize=8)
    ax.set_xlabel("seconds")
    ax.set_title("Round time: deployment (TLS, SuperNode auth) vs simulation")
    ax.legend(fontsize=8)
    save_figure(fig, NAME, "round_time")


BENCHMARK = Benchmark(NAME, settings, measure, COLUMNS, _plot)
