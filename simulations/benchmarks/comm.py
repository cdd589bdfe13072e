"""``fedtune bench comm``: bytes on the wire per site per round, against full fine-tuning.

Every PEFT method runs a short (1-round) federation twice, with and without SecAgg+, on the same
data and seed. The bytes are the payload bytes the coordinator's metered Grid really counted
(``bytes_up_per_site`` / ``bytes_down_per_site`` of ``metrics.json``, averaged over the sites):
under SecAgg+ that is the masked vectors (uint32, :mod:`fedtune.common.secagg_wire`) plus the key
exchange and secret shares, not the fp32 adapter. The adapter upload alone (the plain training reply,
or the masked vector) is read from the coordinator's wire log (``audit/server/wire.jsonl``), so
SecAgg+ is compared with plain both without and with its key material. Only training messages are
exchanged (``fraction-evaluate=0``) and the head is not solved (``head-fit=none``: its statistics
and moments exchanges are measured on the default run, see the README), so a round is exactly what
full fine-tuning would replace.

Full fine-tuning of the same base model would download and upload the whole base state every
round: ``base_model_nbytes`` of the checkpoint (fp32, ~90.9 MB for all-MiniLM-L6-v2; the
classification head, a few kB, is left out, which only makes the ratios smaller).

Full mode: LoRA r=4/8/16 and prefix 10/20, 5 sites (~10 arms x ~40 s on 2 CPU cores, ~7 min).
Quick: LoRA r=8 only, 3 sites (2 arms, ~1-2 min).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .arms import federated_arm
from .figures import new_figure, save_figure
from .spec import Benchmark, Outcome
from .stats import per_site_mean
from .training import run_meta

NAME = "comm"
COLUMNS = (
    "method",
    "secagg",
    "trainable_percent",
    "adapter_bytes",
    "up_bytes_per_site",
    "adapter_up_bytes_per_site",
    "down_bytes_per_site",
    "full_ft_over_up",
    "full_ft_over_down",
    "full_ft_over_total",
    "secagg_adapter_up_overhead",
    "secagg_up_overhead",
)
METHODS: dict[str, dict[str, Any]] = {
    "lora-r4": {"peft-method": "lora", "lora-r": 4},
    "lora-r8": {"peft-method": "lora", "lora-r": 8},
    "lora-r16": {"peft-method": "lora", "lora-r": 16},
    "prefix-10": {"peft-method": "prefix", "prefix-virtual-tokens": 10},
    "prefix-20": {"peft-method": "prefix", "prefix-virtual-tokens": 20},
}
QUICK_METHODS = ("lora-r8", "prefix-10")


def settings(quick: bool) -> dict[str, Any]:
    """Sites and PEFT methods of the full or quick mode (quick: lora-r8 only, the e2e test)."""
    return (
        {"sites": 3, "methods": list(QUICK_METHODS[:1])} if quick else {"sites": 5, "methods": list(METHODS)}
    )


def measure(s: dict[str, Any]) -> Outcome:
    """Each method with and without SecAgg+: bytes per site per round against full fine-tuning."""
    from fedtune.common.base_files import resolve_model_dir
    from fedtune.common.model import base_model_nbytes

    sites = s["sites"]
    base = {
        "num-server-rounds": 1,
        "max-examples": 40 * sites,
        "partitioning": "iid",
        "fraction-evaluate": 0.0,
        "head-fit": "none",  # the adapter's bytes alone: no statistics exchanges
        "min-clients": sites,
        "audit": "true",  # the wire log separates the adapter upload from SecAgg+'s key material
        "seed": 42,
    }
    full_ft = base_model_nbytes(resolve_model_dir(""))
    rows: list[dict[str, Any]] = []
    for method in s["methods"]:
        plain_up = plain_adapter = None
        for secagg in (False, True):
            label = f"{method}-{'secagg' if secagg else 'plain'}"
            arm = federated_arm(
                NAME, label, sites, {**base, **METHODS[method], "secure-aggregation": str(secagg).lower()}
            )
            rec = arm.final
            up, down = per_site_mean(rec, "bytes_up_per_site"), per_site_mean(rec, "bytes_down_per_site")
            adapter_up = adapter_upload_per_site(arm.out)
            plain_up, plain_adapter = (plain_up, plain_adapter) if secagg else (up, adapter_up)
            rows.append(
                {
                    "method": method,
                    "secagg": "SecAgg+" if secagg else "plain",
                    "adapter_bytes": run_meta(arm.out)["adapter_bytes"],
                    "trainable_percent": run_meta(arm.out)["trainable_percent"],
                    "up_bytes_per_site": up,
                    "adapter_up_bytes_per_site": adapter_up,
                    "down_bytes_per_site": down,
                    "full_ft_bytes_each_way": full_ft,
                    "full_ft_over_up": full_ft / up,
                    "full_ft_over_down": full_ft / down,
                    "full_ft_over_total": 2 * full_ft / (up + down),
                    "secagg_adapter_up_overhead": (
                        adapter_up / plain_adapter if secagg and plain_adapter else None
                    ),
                    "secagg_up_overhead": up / plain_up if secagg and plain_up else None,
                }
            )
    return Outcome(rows, _notes(rows, sites, full_ft), {"full_ft_bytes": full_ft, "run_config": base})


def adapter_upload_per_site(out: Path) -> float:
    """Mean payload bytes per site and round of the training replies alone (no SecAgg+ key material).

    The plain training reply carries the fp32 adapter; under SecAgg+ the reply to the
    ``collect_masked_vectors`` request carries the masked vector. Read from the coordinator's wire log.
    """
    from fedtune.common.run_folder import WIRE_LOG, RunFolder

    lines = (RunFolder(out).audit_server / WIRE_LOG).read_text().splitlines()
    sizes = [
        r["payload_bytes"]
        for r in map(json.loads, lines)
        if r["direction"] == "up" and r["kind"] == "train" and r["stage"] in ("", "collect_masked_vectors")
    ]
    if not sizes:
        raise ValueError(f"{out}: the wire log has no training reply; did the arm run with `audit=true`?")
    return sum(sizes) / len(sizes)


def _notes(rows: list[dict[str, Any]], sites: int, full_ft: int) -> list[str]:
    worst = min(rows, key=lambda r: r["full_ft_over_total"])
    notes = [
        f"{sites} sites, 1 round, `fraction-evaluate=0` (training messages only); bytes = payload bytes "
        "counted by the coordinator's metered Grid per site, averaged over the sites.",
        f"Full fine-tuning = the base checkpoint's state, {full_ft:,} bytes (fp32), down and up every round.",
        f"Smallest saving: {worst['method']} with {worst['secagg']} moves "
        f"{worst['full_ft_over_total']:.0f}x fewer bytes per site per round than full fine-tuning.",
    ]
    secured = [r for r in rows if r["secagg_up_overhead"]]
    if secured:
        alone = _span([r["secagg_adapter_up_overhead"] for r in secured])
        total = _span([r["secagg_up_overhead"] for r in secured])
        notes.append(
            f"SecAgg+ upload vs plain in the same run: the masked vector alone {alone} the fp32 adapter "
            f"(uint32 on the wire; target <= 1.05x); with key material and secret shares {total} "
            "(target <= 1.25x)."
        )
    return notes


def _span(values: list[float]) -> str:
    lo, hi = min(values), max(values)
    return f"{lo:.3f}x" if f"{lo:.3f}" == f"{hi:.3f}" else f"{lo:.3f}x to {hi:.3f}x"


def _plot(outcome: Outcome, s: dict[str, Any]) -> None:
    import numpy as np

    rows, full_ft = outcome.rows, outcome.extra["full_ft_bytes"]
    fig, ax = new_figure(8, 4)
    labels = [f"{r['method']}\n{r['secagg']}" for r in rows]
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [r["up_bytes_per_site"] for r in rows], 0.4, label="up per site")
    ax.bar(x + 0.2, [r["down_bytes_per_site"] for r in rows], 0.4, label="down per site")
    ax.axhline(full_ft, color="k", ls="--", label="full fine-tuning (each way)")
    ax.set_yscale("log")
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel("bytes per site per round")
    ax.set_title("Bytes on the wire per site per round")
    ax.legend(fontsize=8)
    save_figure(fig, NAME, "bytes")


BENCHMARK = Benchmark(NAME, settings, measure, COLUMNS, _plot)
