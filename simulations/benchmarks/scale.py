"""``fedtune bench scale``: many simulated hospitals, 10 sampled per round, up to 10,000.

The packaged ICD-10 task with every code (the whole CMS table, :func:`all_codes` examples): 10,000
hospitals hold all of it, ~7.4 codes each, after 200 are held out for the coordinator. Each smaller
N gives its hospitals the same ~7.4 (``max-examples`` = 7.4 x N + 200, stratified), so every
hospital trains the same work at every N and only the count of hospitals changes. IID,
``fraction-train = 10/N``, ``min-clients=10``, ``fraction-evaluate=0``, ``audit=false``, LoRA r=8,
SecAgg+ on, 4 rounds; the coordinator's held-out set is 200 examples at every N.

Measured for the ``fedtune simulate`` process and all its descendants (Ray's processes and
actors included) by :class:`~fedtune.simulations.benchmarks.harness.PeakMemory`: peak summed PSS
(the memory the tree holds: a page shared by k processes counts 1/k in each), peak summed RSS (a
shared page counts in every process that maps it, so it overstates), seconds per round (mean over
rounds 2..) and growth against the smallest N. A baseline arm runs the largest N with Flower's own
message pick-up (:mod:`fedtune.simulations.dispatch` replaced by Flower's loop), to show what the
replacement buys.

Targets: 10,000 hospitals <= 3 GB (PSS) and <= 1.2x the seconds per round of 10 hospitals; 100
hospitals <= 4 GB, 1,000 <= 6 GB.

Full: N = 10, 100, 1,000, 10,000 plus the baseline (~15 min on 2 CPU cores). Quick: N = 10, 50, 3
rounds, no baseline (the targets are not measured).
"""

from __future__ import annotations

import functools
import sys
from typing import Any

from .arms import federated_arm
from .figures import new_figure, save_figure
from .harness import SIMULATE
from .spec import Benchmark, Outcome, target_note

NAME = "scale"
COLUMNS = (
    "hospitals",
    "dispatch",
    "examples",
    "sampled_per_round",
    "peak_pss_gb",
    "peak_rss_gb",
    "pss_growth",
    "s_per_round",
    "round_time_growth",
    "round_1_s",
    "total_s",
)
SAMPLED, HOLDOUT, LARGEST = 10, 200, 10_000
TARGETS_GB = {100: 4.0, 1000: 6.0, LARGEST: 3.0}
ROUND_TIME_TARGET = 1.2  # s/round at LARGEST over s/round at 10 hospitals
# `python -m` entry of the baseline arm: `fedtune simulate` with Flower's own message pick-up
FLOWER_DISPATCH = ("fedtune.simulations.benchmarks.scale", "simulate", "--overwrite")


@functools.cache
def all_codes() -> int:
    """Examples of the packaged ICD-10 task with every code (the whole table)."""
    from fedtune.common.data import load_task

    return len(load_task("icd10-chapter"))


def settings(quick: bool) -> dict[str, Any]:
    """Site counts, rounds and baseline of the full or quick mode."""
    if quick:
        return {"sites": [10, 50], "rounds": 3, "baseline": False}
    return {"sites": [10, 100, 1000, LARGEST], "rounds": 4, "baseline": True}


def run_config(n: int, rounds: int) -> dict[str, Any]:
    """Run config for ``n`` hospitals: the per-hospital share of all codes at 10,000; 200 held out."""
    codes = all_codes()
    total = min(codes, round((codes - HOLDOUT) * n / LARGEST) + HOLDOUT)
    return {
        "num-server-rounds": rounds,
        "max-examples": 0 if total == codes else total,
        "holdout-fraction": HOLDOUT / total,
        "partitioning": "iid",
        "fraction-train": SAMPLED / n,
        "fraction-evaluate": 0.0,
        "min-clients": SAMPLED,
        "audit": "false",
        "seed": 42,
    }


def _row(n: int, rounds: int, flower_dispatch: bool) -> dict[str, Any]:
    label = f"sites{n}-flower-dispatch" if flower_dispatch else f"sites{n}"
    config = run_config(n, rounds)
    arm = federated_arm(NAME, label, n, config, entry=FLOWER_DISPATCH if flower_dispatch else SIMULATE)
    return {
        "hospitals": n,
        "dispatch": "Flower's" if flower_dispatch else "fedtune's",
        "examples": config["max-examples"] or all_codes(),
        "sampled_per_round": len(arm.final.site_train_examples or ()),
        "peak_pss_gb": arm.peak_pss_bytes / 2**30,
        "peak_rss_gb": arm.peak_rss_bytes / 2**30,
        "s_per_round": arm.mean_round_seconds(),
        "round_1_s": arm.records[1].seconds,  # + start-up and the base-model check of the 10 sampled
        "total_s": arm.seconds,
        "macro_f1": arm.final.macro_f1,
    }


def measure(s: dict[str, Any]) -> Outcome:
    """One federation per hospital count (and the baseline): peak memory and round time, and growth."""
    rows = [_row(n, s["rounds"], False) for n in s["sites"]]
    if s["baseline"]:
        rows.append(_row(s["sites"][-1], s["rounds"], True))
    first = rows[0]
    for r in rows:
        r["pss_growth"] = r["peak_pss_gb"] / first["peak_pss_gb"]
        r["round_time_growth"] = r["s_per_round"] / first["s_per_round"]
    per_site = (all_codes() - HOLDOUT) / LARGEST
    notes = [
        f"~{per_site:.1f} ICD-10 codes per hospital (at {LARGEST:,} hospitals: every code of the table), "
        f"{HOLDOUT} held out, {SAMPLED} sampled per round, SecAgg+ on, {s['rounds']} rounds (seconds per "
        "round: mean over rounds 2..; round 1 also starts the actors and checks that the sampled hospitals "
        f"hold the base model). Growth: against {first['hospitals']} hospitals in the same invocation.",
        "Peak memory of the `fedtune simulate` process tree (Ray included): PSS (sampled every 2 s) "
        "counts a page shared by k processes 1/k in each (the memory the tree holds); RSS (every 0.2 s) "
        "counts it k times.",
        "dispatch: fedtune's = Flower's engine asking only the nodes that have a message "
        "(`fedtune.simulations.dispatch`); Flower's = its own loop, which asks every node every 0.1 s.",
    ]
    return Outcome(rows, notes)


def targets(outcome: Outcome, s: dict[str, Any]) -> list[str]:
    """Peak memory at each hospital count of :data:`TARGETS_GB`; round time at :data:`LARGEST`."""
    ours = {r["hospitals"]: r for r in outcome.rows if r["dispatch"] == "fedtune's"}
    lines = []
    for n, limit in TARGETS_GB.items():
        peak = ours[n]["peak_pss_gb"] if n in ours else None
        label = f"Peak memory (PSS) at {n:,} hospitals"
        lines.append(target_note(label, peak, limit, at_most=True, unit=" GB"))
    growth = ours[LARGEST]["round_time_growth"] if LARGEST in ours else None
    label = f"Seconds per round, {LARGEST:,} over 10 hospitals"
    lines.append(target_note(label, growth, ROUND_TIME_TARGET, at_most=True, unit="x"))
    return lines


def _simulate_with_flowers_dispatch(argv: list[str]) -> int:
    """``fedtune simulate ARGV`` with Flower's own message pick-up (the baseline arm)."""
    from fedtune.simulations import cli, dispatch

    dispatch.use_fast_dispatch = lambda: None  # simulate() installs nothing: Flower's loop stays
    return cli.main(["simulate", *argv])


def _plot(outcome: Outcome, s: dict[str, Any]) -> None:
    rows = [r for r in outcome.rows if r["dispatch"] == "fedtune's"]
    base = [r for r in outcome.rows if r["dispatch"] != "fedtune's"]
    fig, (ax1, ax2) = new_figure(10, 4, ncols=2)
    n = [r["hospitals"] for r in rows]
    ax1.plot(n, [r["peak_pss_gb"] for r in rows], "o-", label="PSS")
    ax1.plot(n, [r["peak_rss_gb"] for r in rows], "s--", color="tab:gray", label="RSS")
    for h, limit in TARGETS_GB.items():
        ax1.scatter([h], [limit], marker="_", s=300, color="tab:red")
    ax1.set_xscale("log")
    ax1.set_xlabel("simulated hospitals")
    ax1.set_ylabel("peak memory of the process tree (GB)")
    ax1.set_title("Memory (red: targets)")
    ax1.legend(fontsize=8)
    ax2.plot(n, [r["s_per_round"] for r in rows], "o-", label="fedtune's dispatch")
    if base:
        x, y = [r["hospitals"] for r in base], [r["s_per_round"] for r in base]
        ax2.scatter(x, y, color="tab:red", label="Flower's dispatch")
    ax2.axhline(ROUND_TIME_TARGET * rows[0]["s_per_round"], color="tab:red", ls=":", lw=1, label="target")
    ax2.legend(fontsize=8)
    ax2.set_xscale("log")
    ax2.set_xlabel("simulated hospitals")
    ax2.set_ylabel("seconds per round")
    ax2.set_title(f"Round time, {SAMPLED} sampled per round")
    save_figure(fig, NAME, "growth")


BENCHMARK = Benchmark(NAME, settings, measure, COLUMNS, _plot, targets)

if __name__ == "__main__":
    if sys.argv[1:2] != ["simulate"]:
        sys.exit("usage: python -m fedtune.simulations.benchmarks.scale simulate [fedtune simulate options]")
    sys.exit(_simulate_with_flowers_dispatch(sys.argv[2:]))
