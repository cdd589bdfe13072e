"""``fedtune bench privacy``: what client-level DP buys against membership inference, and costs.

For epsilon = inf, 8 and 2 at delta = 1e-5: one ``fedtune simulate`` run each with
``audit-canaries`` synthetic canary patients planted at site 0 (each with probability 1/2),
then ``fedtune audit OUT``; read from ``OUT/audit/report.json``: the membership-inference attack's
AUC and TPR at 1% FPR, the one-run empirical epsilon lower bound (Steinke, Nasr and Jagielski 2023,
95% confidence) beside the accountant's epsilon; from ``metrics.json``: final accuracy and macro-F1.

- epsilon = inf: ``dp-mode=off`` (no clipping, no noise: the baseline the cost is measured against);
- finite epsilon: ``dp-mode=distributed`` (each site clips its update to ``dp-clipping-norm`` 0.5 and
  adds its share of the noise before SecAgg+), noise multiplier from
  :func:`fedtune.common.privacy.noise_for_epsilon` (sampling rate 1.0: every site every round, R
  rounds, delta 1e-5, RDP). ``secagg-clipping-range`` is raised above its default 8 when a site's
  noised values could exceed it (8 standard deviations of a site's noise share + the clipping norm),
  since a site refuses to upload values SecAgg+ would clip.

Full: 5 hospitals, the default data (``max-examples=4000``), 5 rounds, 500 canaries (~20-25 min on
2 CPU cores). Quick: 3 hospitals, 2 rounds, ``max-examples=400``, 200 canaries.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

from fedtune.common.run_folder import RunFolder

from .arms import federated_arm
from .figures import new_figure, save_figure
from .harness import console
from .spec import Benchmark, Outcome

NAME = "privacy"
COLUMNS = (
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
)
EPSILONS: tuple[float, ...] = (math.inf, 8.0, 2.0)
DELTA = 1e-5
CLIPPING_NORM = 0.5


def settings(quick: bool) -> dict[str, Any]:
    """Sites, rounds, data and canaries of the full or quick mode."""
    if quick:
        return {"sites": 3, "rounds": 2, "max_examples": 400, "canaries": 200}
    return {"sites": 5, "rounds": 5, "max_examples": 4000, "canaries": 500}


def dp_settings(epsilon: float, rounds: int, sites: int) -> dict[str, Any]:
    """Run-config keys for ``epsilon`` (``inf`` = DP off)."""
    from fedtune.common.privacy import noise_for_epsilon

    if math.isinf(epsilon):
        return {"dp-mode": "off"}
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
    """A federation and its audit per epsilon: the accountant's, the empirical epsilon and the cost."""
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
    rows = []
    for eps in EPSILONS:
        dp = dp_settings(eps, s["rounds"], s["sites"])
        arm = federated_arm(NAME, f"epsilon-{eps:g}", s["sites"], {**base, **dp})
        report = audit(arm.out)
        mia, emp = report["membership_inference"], report["empirical_epsilon"]
        rows.append(
            {
                "target_epsilon": "inf" if math.isinf(eps) else eps,
                "noise_multiplier": dp.get("dp-noise-multiplier", 0.0),
                "accountant_epsilon": emp.get("accountant_epsilon"),
                "recorded_dp_epsilon": arm.final.dp_epsilon,
                "empirical_epsilon_lb": emp["lower_bound"],
                "mia_auc": mia["attack_auc"],
                "tpr_at_1pct_fpr": mia["tpr_at_1pct_fpr"],
                "accuracy": arm.final.accuracy,
                "macro_f1": arm.final.macro_f1,
            }
        )
    base_row = rows[0]
    for r in rows:
        r["macro_f1_cost_points"] = 100 * (base_row["macro_f1"] - r["macro_f1"])
        r["accuracy_cost_points"] = 100 * (base_row["accuracy"] - r["accuracy"])
    notes = [
        f"{s['sites']} hospitals, {s['rounds']} rounds, max-examples {s['max_examples']}, "
        f"{s['canaries']} canaries at site 0 (each a member with probability 1/2), delta {DELTA:g}, "
        f"clipping norm {CLIPPING_NORM} for the DP arms; costs are in points against the epsilon = inf "
        "run of the same invocation.",
        *(_row_note(r) for r in rows),
    ]
    return Outcome(rows, notes, {"run_config": base})


def _row_note(r: dict[str, Any]) -> str:
    lb, acc = r["empirical_epsilon_lb"], r["accountant_epsilon"]
    tail = f"MIA AUC {r['mia_auc']:.3f}; macro-F1 cost {r['macro_f1_cost_points']:+.1f} points."
    if acc is None:
        return f"epsilon inf (DP off): empirical lower bound {lb:.3f}; {tail}"
    verdict = "consistent" if lb <= acc else "INCONSISTENT: the audit beats the accountant"
    eps = r["target_epsilon"]
    return f"epsilon {eps}: empirical lower bound {lb:.3f} vs accountant {acc:.3f} ({verdict}); {tail}"


def _plot(outcome: Outcome, s: dict[str, Any]) -> None:
    rows = outcome.rows
    fig, (ax1, ax2) = new_figure(10, 4, ncols=2)
    labels = [f"eps={r['target_epsilon']}" for r in rows]
    ax1.bar(labels, [r["mia_auc"] for r in rows], color="tab:purple")
    ax1.axhline(0.5, color="k", ls=":", label="chance")
    ax1.set_ylabel("membership-inference AUC (canaries)")
    ax1.set_title("Attack success")
    ax1.legend()
    ax2.bar(labels, [r["macro_f1"] for r in rows], color="tab:blue")
    ax2.set_ylabel("final macro-F1 (held-out)")
    ax2.set_title("Utility")
    save_figure(fig, NAME, "tradeoff")


BENCHMARK = Benchmark(NAME, settings, measure, COLUMNS, _plot)
