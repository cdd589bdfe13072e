"""``fedtune bench methods``: LoRA ranks vs prefix-tuning lengths on the same federation.

LoRA r = 4, 8, 16 (``lora-alpha`` 16, ``query,value``) and prefix tuning with 10 and 20 virtual
tokens, each a ``fedtune simulate`` run on the same data, partition, seed, rounds and learning rate
(the project defaults: ICD-10 chapters, ``max-examples=4000``, Dirichlet(1.0) over 5 hospitals,
5 rounds, ``learning-rate=0.005``, SecAgg+). Reported per method:

- trainable share of the model's parameters (``OUT/adapter/fedtune.json``);
- bytes uploaded and downloaded per site per round (``bytes_up_per_site`` / ``bytes_down_per_site``
  of ``metrics.json``: the masked SecAgg+ payload really exchanged), mean over sites and rounds;
- final accuracy and macro-F1 on the coordinator's held-out set;
- seconds per round, mean over rounds 2.. (round 1 also starts the Ray actors).

Sites do not score locally (``fraction-evaluate=0``), so a round is training + SecAgg+ + the
coordinator's held-out evaluation.

Full: 5 arms x ~5-6 min on 2 CPU cores (~30 min). Quick: lora-r8 and prefix-10 only, 3 hospitals,
2 rounds, ``max-examples=300`` (~3-4 min).
"""

from __future__ import annotations

from typing import Any

from .arms import federated_arm
from .comm import METHODS, QUICK_METHODS
from .figures import new_figure, save_figure
from .spec import Benchmark, Outcome
from .stats import mean_over_rounds, per_site_mean
from .training import run_meta

NAME = "methods"
COLUMNS = (
    "method",
    "trainable_percent",
    "adapter_bytes",
    "up_bytes_per_site_round",
    "down_bytes_per_site_round",
    "accuracy",
    "macro_f1",
    "seconds_per_round",
)


def settings(quick: bool) -> dict[str, Any]:
    """Sites and run config of the full or quick mode."""
    if quick:
        return {
            "sites": 3,
            "methods": list(QUICK_METHODS),
            "run_config": {"num-server-rounds": 2, "max-examples": 300, "partitioning": "iid"},
        }
    return {
        "sites": 5,
        "methods": list(METHODS),
        "run_config": {
            "num-server-rounds": 5,
            "max-examples": 4000,
            "partitioning": "dirichlet",
            "dirichlet-alpha": 1.0,
        },
    }


def measure(s: dict[str, Any]) -> Outcome:
    """One federation per PEFT method on the same data: size, bytes, quality and round time."""
    base = {
        **s["run_config"],
        "min-clients": s["sites"],
        "fraction-evaluate": 0.0,
        "audit": "false",
        "seed": 42,
    }
    rows = []
    for method in s["methods"]:
        overrides = METHODS[method]
        arm = federated_arm(NAME, method, s["sites"], {**base, **overrides})
        meta = run_meta(arm.out)
        rows.append(
            {
                "method": method,
                "trainable_parameters": meta["trainable_parameters"],
                "trainable_percent": meta["trainable_percent"],
                "adapter_bytes": meta["adapter_bytes"],
                "up_bytes_per_site_round": mean_over_rounds(
                    arm.records, lambda r: per_site_mean(r, "bytes_up_per_site")
                ),
                "down_bytes_per_site_round": mean_over_rounds(
                    arm.records, lambda r: per_site_mean(r, "bytes_down_per_site")
                ),
                "accuracy": arm.final.accuracy,
                "macro_f1": arm.final.macro_f1,
                "seconds_per_round": arm.mean_round_seconds(),
                "rounds": arm.final.round,
            }
        )
    lora8 = next(r for r in rows if r["method"] == "lora-r8")
    notes = [
        f"{s['sites']} hospitals, `{' '.join(f'{k}={v}' for k, v in base.items())}`; same data, partition, "
        "seed and rounds for every method.",
        "Bytes per site per round: payload really exchanged under SecAgg+ (masked int64 up), mean over "
        "sites and rounds; seconds per round: mean over rounds 2.. (training, SecAgg+, held-out scoring).",
        *(
            f"{r['method']}: {r['up_bytes_per_site_round'] / lora8['up_bytes_per_site_round']:.2f}x "
            f"the upload of lora-r8, macro-F1 {100 * (r['macro_f1'] - lora8['macro_f1']):+.1f} points "
            "vs lora-r8, "
            f"{r['seconds_per_round'] / lora8['seconds_per_round']:.2f}x its round time."
            for r in rows
            if r is not lora8
        ),
    ]
    return Outcome(rows, notes, {"run_config": base})


def _plot(outcome: Outcome, s: dict[str, Any]) -> None:
    rows = outcome.rows
    fig, (ax1, ax2) = new_figure(10, 4, ncols=2)
    for r in rows:
        ax1.scatter(r["up_bytes_per_site_round"], r["macro_f1"], s=40)
        ax1.annotate(
            r["method"],
            (r["up_bytes_per_site_round"], r["macro_f1"]),
            fontsize=8,
            xytext=(4, 4),
            textcoords="offset points",
        )
    ax1.set_xscale("log")
    ax1.set_xlabel("bytes uploaded per site per round")
    ax1.set_ylabel("final macro-F1 (held-out)")
    ax1.set_title("Quality vs communication")
    ax2.bar([r["method"] for r in rows], [r["seconds_per_round"] for r in rows])
    ax2.set_ylabel("seconds per round")
    ax2.set_title("Time per round")
    ax2.tick_params(axis="x", labelsize=8)
    save_figure(fig, NAME, "tradeoff")


BENCHMARK = Benchmark(NAME, settings, measure, COLUMNS, _plot)
