"""``fedtune bench privacy``: what client-level and patient-level DP buy against membership inference.

One ``fedtune simulate`` run per arm with ``audit-canaries`` synthetic canary patients planted at
site 0 (each with probability 1/2), then ``fedtune audit OUT``; read from ``OUT/audit/report.json``:
the membership-inference attack's AUC and TPR at 1% FPR, the one-run empirical epsilon lower bound
(Steinke, Nasr and Jagielski 2023, 95% confidence) beside the accountant's epsilon; from
``metrics.json``: final accuracy, macro-F1 and seconds per round. delta = 1e-5 everywhere.

- ``off``: no DP (epsilon = inf), the baseline the costs are measured against;
- ``client`` at epsilon 8 and 2 (the whole hospital is the unit): ``dp-mode=distributed``, each site
  clips its update to ``dp-clipping-norm`` 0.5 and adds its share of the noise before SecAgg+, noise
  multiplier from :func:`fedtune.common.privacy.noise_for_epsilon` (every site every round, RDP).
  ``secagg-clipping-range`` is raised above its default 8 when a site's noised values could exceed
  it (8 standard deviations of a site's noise share + the clipping norm);
- ``patient`` at epsilon 8, 4, 2 and 1 (one record is the unit): ``dp-mode=example``, DP-SGD at each
  site with sigma calibrated by the site to ``dp-example-target-epsilon`` over the run; the
  accountant epsilon shown is the canary site's (site 0).

Full: 5 hospitals, the default data (``max-examples=4000``), 5 rounds, 500 canaries (~1 h 15 min on 2
CPU cores). Quick: 3 hospitals, 2 rounds, ``max-examples=400``, 200 canaries, one arm of each unit.
Pick arms with ``FEDTUNE_BENCH_ARMS`` (e.g. ``off,patient-8,patient-2``; ``off`` first).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

from fedtune.common.run_folder import RunFolder

from .arms import choose, env_list, federated_arm
from .figures import new_figure, save_figure
from .harness import console
from .spec import Benchmark, Outcome, target_note

NAME = "privacy"
COLUMNS = (
    "unit",
    "target_epsilon",
    "noise_multiplier",
    "accountant_epsilon",
    "empirical_epsilon_lb",
    "mia_auc",
    "tpr_at_1pct_fpr",
    "accuracy",
    "macro_f1",
    "accuracy_cost_points",
    "macro_f1_cost_points",
    "s_per_round",
    "round_time_ratio",
)
ARMS: tuple[tuple[str, float], ...] = (
    ("off", math.inf),
    ("client", 8.0),
    ("client", 2.0),
    ("patient", 8.0),
    ("patient", 4.0),
    ("patient", 2.0),
    ("patient", 1.0),
)
DELTA = 1e-5
CLIPPING_NORM = 0.5


def settings(quick: bool) -> dict[str, Any]:
    """Sites, rounds, data, canaries and arms (``[unit, epsilon]``) of the full or quick mode."""
    arms = [[unit, f"{eps:g}"] for unit, eps in ((ARMS[0], ARMS[1], ARMS[3]) if quick else ARMS)]
    if quick:
        return {"sites": 3, "rounds": 2, "max_examples": 400, "canaries": 200, "arms": arms}
    return {"sites": 5, "rounds": 5, "max_examples": 4000, "canaries": 500, "arms": arms}


def chosen_settings(quick: bool) -> dict[str, Any]:
    """:func:`settings` with the arms of ``$FEDTUNE_BENCH_ARMS`` (``off``, ``client-8``, ``patient-2``...)."""
    s = settings(quick)
    names = {_arm_name(unit, eps): [unit, eps] for unit, eps in settings(False)["arms"]}
    default = [_arm_name(unit, eps) for unit, eps in s["arms"]]
    picked = choose("FEDTUNE_BENCH_ARMS", env_list("FEDTUNE_BENCH_ARMS", default), list(names))
    if picked[0] != "off":
        raise ValueError("$FEDTUNE_BENCH_ARMS: the first arm must be `off`, the baseline of every cost.")
    s["arms"] = [names[name] for name in picked]
    return s


def _arm_name(unit: str, eps: str) -> str:
    return "off" if unit == "off" else f"{unit}-{eps}"


def _arm_name(unit: str, eps: str) -> str:
    return "off" if unit == "off" else f"{unit}-{eps}"


def dp_settings(unit: str, epsilon: float, rounds: int, sites: int) -> dict[str, Any]:
    """Run-config keys of an arm: ``unit`` ``off``, ``client`` or ``patient`` at ``epsilon``."""
    from fedtune.common.privacy import noise_for_epsilon

    if unit == "off":
        return {"dp-mode": "off"}
    if unit == "patient":
        return {"dp-mode": "example", "dp-example-target-epsilon": epsilon, "dp-delta": DELTA}
    sigma = noise_for_epsilon(target_epsilon=epsilon, sampling_rate=1.0, rounds=rounds, delta=DELTA)
    site_std = sigma * CLIPPING_NORM / math.sqrt(sites)
    return {
        "dp-mode": "distributed",
        "dp-noise-multiplier": sigma,
        "dp-clipping-norm": CLIPPING_NORM,
        "dp-delta": DELTA,
        "secagg-clipping-range": max(8.0, math.ceil(8 * site_std + CLIPPING_NORM)),
    }


def audit(out: Path) -> dict[str, Any]:
    """Run ``fedtune audit OUT`` (a subprocess) and return ``OUT/audit/report.json``."""
    cmd = [sys.executable, "-m", "fedtune.simulations.cli", "audit", str(out)]
    console.print(f"[dim]$ fedtune audit {out}[/dim]")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"fedtune audit {out} failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(RunFolder(out).audit_report.read_text())


def measure(s: dict[str, Any]) -> Outcome:
    """A federation and its audit per arm: the accountant's and the empirical epsilon, and the cost."""
    base = {
        "num-server-rounds": s["rounds"],
        "max-examples": s["max_examples"],
        "partitioning": "iid",
        "min-clients": s["sites"],
        "fraction-evaluate": 0.0,
        "audit": "true",
        "audit-canaries": s["canaries"],
        "seed": 42,
    }
    rows = [_arm_row(unit, float(eps), base, s) for unit, eps in s["arms"]]
    base_row = rows[0]
    for r in rows:
        r["macro_f1_cost_points"] = 100 * (base_row["macro_f1"] - r["macro_f1"])
        r["accuracy_cost_points"] = 100 * (base_row["accuracy"] - r["accuracy"])
        r["round_time_ratio"] = r["s_per_round"] / base_row["s_per_round"]
    notes = [
        f"{s['sites']} hospitals, {s['rounds']} rounds, max-examples {s['max_examples']}, "
        f"{s['canaries']} canaries at site 0 (each a member with probability 1/2), delta {DELTA:g}, "
        f"client-level clipping norm {CLIPPING_NORM}; patient-level: DP-SGD, clipping norm 1.0 per example, "
        "sigma calibrated at each site; costs and round-time ratios against the first arm (DP off) of "
        "the same invocation.",
        *(_row_note(r) for r in rows),
    ]
    return Outcome(rows, notes, {"run_config": base})


def _arm_row(unit: str, eps: float, base: dict[str, Any], s: dict[str, Any]) -> dict[str, Any]:
    """Run one arm and its audit; its row."""
    dp = dp_settings(unit, eps, s["rounds"], s["sites"])
    arm = federated_arm(NAME, f"{unit}-epsilon-{eps:g}", s["sites"], {**base, **dp})
    report = audit(arm.out)
    mia, emp = report["membership_inference"], report["empirical_epsilon"]
    patient = unit == "patient"
    return {
        "unit": unit,
        "target_epsilon": "inf" if math.isinf(eps) else eps,
        "noise_multiplier": (
            arm.final.sites_example_dp["0"]["sigma"] if patient else dp.get("dp-noise-multiplier", 0.0)
        ),
        "accountant_epsilon": emp.get("canary_site_example_epsilon" if patient else "accountant_epsilon"),
        "recorded_dp_epsilon": arm.final.example_dp_epsilon if patient else arm.final.dp_epsilon,
        "empirical_epsilon_lb": emp["lower_bound"],
        "mia_auc": mia["attack_auc"],
        "tpr_at_1pct_fpr": mia["tpr_at_1pct_fpr"],
        "accuracy": arm.final.accuracy,
        "macro_f1": arm.final.macro_f1,
        "s_per_round": arm.mean_round_seconds(),
    }


def targets(outcome: Outcome, s: dict[str, Any]) -> list[str]:
    """Patient-level DP's targets: utility at epsilon 8 and 2, round time, MIA, audit below accountant."""
    rows = outcome.rows

    def patient(eps: float) -> dict[str, Any] | None:
        return next((r for r in rows if r["unit"] == "patient" and r["target_epsilon"] == eps), None)

    def cost(eps: float) -> float | None:
        row = patient(eps)
        return None if row is None else row["macro_f1_cost_points"]

    at8 = patient(8.0)
    dp_rows = [r for r in rows if r["accountant_epsilon"] is not None]
    slowest = max((r["round_time_ratio"] for r in rows if r["unit"] == "patient"), default=None)
    beaten = float(sum(r["empirical_epsilon_lb"] > r["accountant_epsilon"] for r in dp_rows))
    cost_note = "Patient-level epsilon {:g}: macro-F1 cost in points"
    return [
        target_note(cost_note.format(8), cost(8.0), 5.0, at_most=True, digits=1),
        target_note(cost_note.format(2), cost(2.0), 10.0, at_most=True, digits=1),
        target_note("DP-SGD round time / non-private (slowest arm)", slowest, 2.0, at_most=True, unit="x"),
        target_note("MIA AUC at patient-level epsilon 8", at8 and at8["mia_auc"], 0.55, at_most=True),
        target_note(
            "Runs whose empirical epsilon beats the accountant's", beaten, 0.0, at_most=True, digits=0
        ),
    ]


def _row_note(r: dict[str, Any]) -> str:
    lb, acc = r["empirical_epsilon_lb"], r["accountant_epsilon"]
    tail = f"MIA AUC {r['mia_auc']:.3f}; macro-F1 cost {r['macro_f1_cost_points']:+.1f} points."
    if acc is None:
        return f"epsilon inf (DP off): empirical lower bound {lb:.3f}; {tail}"
    verdict = "consistent" if lb <= acc else "INCONSISTENT: the audit beats the accountant"
    eps, unit = r["target_epsilon"], r["unit"]
    return (
        f"{unit}-level epsilon {eps}: empirical lower bound {lb:.3f} vs accountant {acc:.3f} ({verdict}); "
        + tail
    )


def _plot(outcome: Outcome, s: dict[str, Any]) -> None:
    rows = outcome.rows
    fig, (ax1, ax2) = new_figure(10, 4, ncols=2)
    labels = [f"{r['unit']}\neps={r['target_epsilon']}" for r in rows]
    ax1.bar(labels, [r["mia_auc"] for r in rows], color="tab:purple")
    ax1.axhline(0.5, color="k", ls=":", label="chance")
    ax1.set_ylabel("membership-inference AUC (canaries)")
    ax1.set_title("Attack success")
    ax1.legend()
    ax2.bar(labels, [r["macro_f1"] for r in rows], color="tab:blue")
    ax2.set_ylabel("final macro-F1 (held-out)")
    ax2.set_title("Utility")
    save_figure(fig, NAME, "tradeoff")


BENCHMARK = Benchmark(NAME, chosen_settings, measure, COLUMNS, _plot, targets)
