"""``fedtune bench scale``: many simulated hospitals, 10 sampled per round.

N = 10, 100 and 1,000 hospitals, each holding ~20 examples (``max-examples = 20 x N + 200``, IID,
``holdout-fraction`` chosen so the coordinator's held-out set is 200 examples at every N, so its
scoring costs the same), ``fraction-train = 10/N`` and ``min-clients=10`` (10 sites train each
round), ``fraction-evaluate=0``, ``audit=false``, LoRA r=8, SecAgg+ on, 4 rounds. Measured for the
``fedtune simulate`` process and all its descendants (Ray's processes and actors included), by
:class:`fedtune.simulations.benchmarks.harness.PeakRss`: peak summed RSS, seconds per round (mean over
rounds 2..) and the growth of both against the smallest N of the same invocation. Summed RSS counts
memory shared between processes (Ray's object store, shared libraries) once per process, so it
overstates the real footprint. Targets: 100 hospitals <= 4 GB, 1,000 within 6 GB.

Full: N = 10, 100, 1000 (~10-20 min on 2 CPU cores). Quick: N = 10, 50, 3 rounds (the targets are
not measured).
"""

from __future__ import annotations

from typing import Any

from .arms import federated_arm
from .figures import new_figure, save_figure
from .spec import Benchmark, Outcome, target_note

NAME = "scale"
COLUMNS = (
    "hospitals",
    "sampled_per_round",
    "peak_rss_gb",
    "rss_growth",
    "s_per_round",
    "round_time_growth",
    "round_1_s",
    "total_s",
)
SAMPLED, PER_SITE, HOLDOUT = 10, 20, 200
TARGETS_GB = {100: 4.0, 1000: 6.0}


def settings(quick: bool) -> dict[str, Any]:
    """Site counts and rounds of the full or quick mode."""
    return {"sites": [10, 50], "rounds": 3} if quick else {"sites": [10, 100, 1000], "rounds": 4}


def run_config(n: int, rounds: int) -> dict[str, Any]:
    """Run config for ``n`` hospitals: ~20 examples each, 200 held out, 10 sampled per round."""
    total = PER_SITE * n + HOLDOUT
    return {
        "num-server-rounds": rounds,
        "max-examples": total,
        "holdout-fraction": HOLDOUT / total,
        "partitioning": "iid",
        "fraction-train": SAMPLED / n,
        "fraction-evaluate": 0.0,
        "min-clients": SAMPLED,
        "audit": "false",
        "seed": 42,
    }


def measure(s: dict[str, Any]) -> Outcome:
    """One federation per hospital count: peak memory and round time, and their growth."""
    rows = []
    for n in s["sites"]:
        arm = federated_arm(NAME, f"sites{n}", n, run_config(n, s["rounds"]))
        rows.append(
            {
                "hospitals": n,
                "sampled_per_round": len(arm.final.site_train_examples or ()),
                "peak_rss_gb": arm.peak_rss_bytes / 2**30,
                "s_per_round": arm.mean_round_seconds(),
                "round_1_s": arm.records[1].seconds,  # + start-up and the base-model check of all N
                "total_s": arm.seconds,
                "macro_f1": arm.final.macro_f1,
            }
        )
    first = rows[0]
    for r in rows:
        r["rss_growth"] = r["peak_rss_gb"] / first["peak_rss_gb"]
        r["round_time_growth"] = r["s_per_round"] / first["s_per_round"]
    notes = [
        f"~{PER_SITE} examples per hospital, {HOLDOUT} held out, {SAMPLED} sampled per round, SecAgg+ on, "
        f"{s['rounds']} rounds (seconds per round: mean over rounds 2..; round 1 also starts the actors and "
        "checks that every hospital holds the base model, one message each). Growth: against "
        f"{first['hospitals']} hospitals in the same invocation.",
        "Peak RSS: summed over the `fedtune simulate` process tree (Ray included), sampled every 0.2 s; "
        "shared memory is counted once per process, so this overstates the footprint.",
    ]
    return Outcome(rows, notes)


def targets(outcome: Outcome, s: dict[str, Any]) -> list[str]:
    """Peak memory at each hospital count of :data:`TARGETS_GB`."""
    lines = []
    for n, limit in TARGETS_GB.items():
        row = next((r for r in outcome.rows if r["hospitals"] == n), None)
        peak = None if row is None else row["peak_rss_gb"]
        lines.append(target_note(f"Peak RSS at {n} hospitals", peak, limit, at_most=True, unit=" GB"))
    return lines


def _plot(outcome: Outcome, s: dict[str, Any]) -> None:
    rows = outcome.rows
    fig, (ax1, ax2) = new_figure(10, 4, ncols=2)
    n = [r["hospitals"] for r in rows]
    ax1.plot(n, [r["peak_rss_gb"] for r in rows], "o-")
    for h, limit in TARGETS_GB.items():
        ax1.scatter([h], [limit], marker="_", s=300, color="tab:red")
    ax1.set_xscale("log")
    ax1.set_xlabel("simulated hospitals")
    ax1.set_ylabel("peak RSS of the process tree (GB)")
    ax1.set_title("Memory (red: targets)")
    ax2.plot(n, [r["s_per_round"] for r in rows], "o-")
    ax2.set_xscale("log")
    ax2.set_xlabel("simulated hospitals")
    ax2.set_ylabel("seconds per round")
    ax2.set_title(f"Round time, {SAMPLED} sampled per round")
    save_figure(fig, NAME, "growth")


BENCHMARK = Benchmark(NAME, settings, measure, COLUMNS, _plot, targets)
