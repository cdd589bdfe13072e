"""``fedtune bench rounds``: how the gap between federated and centralized PEFT closes with rounds.

``fedtune bench quality`` compares the arms after 5 rounds (the project's default). This benchmark
follows them much longer on the quality benchmark's target setting (ICD-10 chapter task, 10
hospitals, Dirichlet alpha = 0.3, ``max-examples=4000``, LoRA r=8, seed 42) and scores every arm on
the coordinator's held-out set along the way, at equal examples seen:

- **fedavg**: one ``fedtune simulate`` run of ``R`` rounds x 1 local epoch; the coordinator scores the
  shared adapter after every round (``metrics.json``);
- **centralized**: one training run on the union of the sites' training splits for ``R`` epochs
  (one optimiser throughout), scored after epoch ``r`` = the examples the federation saw by round ``r``;
- **local-only**: each site alone for ``R`` epochs, scored at the same points; mean and best site.

Reported per checkpoint: macro-F1 and accuracy of each arm, the gap centralized - federated and the
lift federated - mean local-only (the quality targets: gap <= 2 points, lift >= 10 points), and the
first round where each target is met. Full: ``R`` = 20, checkpoints 1, 2, 3, 5, 10, 15, 20 (~1 h on 2
CPU cores). Quick: 4 hospitals, ``max-examples=800``, ``R`` = 3. ``FEDTUNE_BENCH_RESUME=1`` reuses
the federated and the in-process arms saved in ``results/arms/rounds/``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fedtune.common.records import RoundRecord, records_from_json

from .arms import arms_dir, cached, federated_arm, resolved
from .figures import new_figure, save_figure
from .spec import Benchmark, Outcome
from .training import concat, train_and_score

NAME = "rounds"
COLUMNS = (
    "round",
    "examples_seen",
    "fedavg_macro_f1",
    "centralized_macro_f1",
    "local_mean_macro_f1",
    "local_best_macro_f1",
    "gap_points",
    "lift_points",
    "fedavg_accuracy",
    "centralized_accuracy",
)
GAP_TARGET, LIFT_TARGET = 0.02, 0.10  # macro-F1, as fractions


def settings(quick: bool) -> dict[str, Any]:
    """Sites, data size, rounds and checkpoints of the full or quick mode."""
    if quick:
        return {"sites": 4, "max_examples": 800, "rounds": 3, "checkpoints": [1, 2, 3]}
    return {"sites": 10, "max_examples": 4000, "rounds": 20, "checkpoints": [1, 2, 3, 5, 10, 15, 20]}


def measure(s: dict[str, Any]) -> Outcome:
    """FedAvg, centralized and each site alone, scored at each checkpoint (saved arms reused)."""
    run_config = {
        "num-server-rounds": s["rounds"],
        "local-epochs": 1,
        "max-examples": s["max_examples"],
        "min-clients": s["sites"],
        "fraction-evaluate": 0.0,
        "audit": "false",
        "seed": 42,
        "partitioning": "dirichlet",
        "dirichlet-alpha": 0.3,
        "strategy": "fedavg",
    }
    key = {
        "sites": s["sites"],
        "run_config": run_config,
        "checkpoints": s["checkpoints"],
        "config": resolved(run_config),
    }
    folder = arms_dir(NAME)

    def federated() -> dict[str, Any]:
        arm = federated_arm(NAME, "fedavg", s["sites"], run_config)
        return {"records": [r.to_json() for r in arm.records], "seconds": arm.seconds}

    fed = cached(folder / "fedavg.json", key, federated)
    pooled = cached(
        folder / "pooled.json", key, lambda: _pooled_curves(run_config, s["sites"], s["checkpoints"])
    )
    fed_records = records_from_json(fed["records"], str(folder / "fedavg.json"))
    rows = curve_rows(fed_records, pooled["centralized"], pooled["local"], s["checkpoints"])
    train_examples = pooled["train_examples"]
    for r in rows:
        r["examples_seen"] = r["round"] * train_examples
    notes = [
        f"{s['sites']} hospitals, Dirichlet alpha 0.3, max-examples {s['max_examples']} "
        f"({train_examples} training examples over all sites), LoRA r=8, seed 42, FedAvg with 1 local "
        "epoch per round; centralized and local-only are one run each, scored after the epoch that "
        "matches the round (same examples seen).",
    ]
    return Outcome(rows, notes)


def _pooled_curves(run_config: Mapping[str, Any], sites: int, checkpoints: Sequence[int]) -> dict[str, Any]:
    """Centralized training on the union of the sites' splits, and each site alone, scored along the way."""
    from fedtune.common.config import parse_run_config
    from fedtune.common.sites import coordinator_test_set, simulated_site

    cfg = parse_run_config(dict(run_config))
    test = coordinator_test_set(cfg)
    trains = [simulated_site(cfg, i, sites).train for i in range(sites)]
    epochs = max(checkpoints)
    central = train_and_score(cfg, concat(trains), test, epochs=epochs, curve_at=checkpoints)
    local = [train_and_score(cfg, t, test, epochs=epochs, curve_at=checkpoints)["curve"] for t in trains]
    return {"centralized": central["curve"], "local": local, "train_examples": central["train_examples"]}


def curve_rows(
    fed_records: Sequence[RoundRecord],
    central: Sequence[Mapping[str, float]],
    local: Sequence[Sequence[Mapping[str, float]]],
    checkpoints: Sequence[int],
) -> list[dict[str, Any]]:
    """One row per checkpoint: each arm's held-out scores, the gap and the lift in macro-F1 points.

    ``fed_records`` are the coordinator's per-round records (``metrics.json``); ``central`` and each
    site's ``local`` curve hold one ``{"epoch", "accuracy", "macro_f1"}`` per checkpoint.

    Raises
    ------
    ValueError
        When an arm has no score at a checkpoint (names the arm and the round).
    """
    by_round = {r.round: r for r in fed_records}

    def at(curve: Sequence[Mapping[str, float]], arm: str, epoch: int) -> Mapping[str, float]:
        for point in curve:
            if int(point["epoch"]) == epoch:
                return point
        raise ValueError(f"The {arm} arm has no score after epoch {epoch}.")

    rows = []
    for r in checkpoints:
        if r not in by_round:
            raise ValueError(f"The federated run has no record of round {r}.")
        fed, cen = by_round[r], at(central, "centralized", r)
        sites = [at(c, f"site {i}", r)["macro_f1"] for i, c in enumerate(local)]
        local_mean = sum(sites) / len(sites)
        rows.append(
            {
                "round": r,
                "fedavg_macro_f1": fed.macro_f1,
                "centralized_macro_f1": cen["macro_f1"],
                "local_mean_macro_f1": local_mean,
                "local_best_macro_f1": max(sites),
                "gap_points": round(100 * (cen["macro_f1"] - fed.macro_f1), 1),
                "lift_points": round(100 * (fed.macro_f1 - local_mean), 1),
                "fedavg_accuracy": fed.accuracy,
                "centralized_accuracy": cen["accuracy"],
            }
        )
    return rows


def target_notes(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Where (if at all) the quality targets are met along the curve."""
    last = rows[-1]
    notes = []
    for column, target, text in (
        ("gap_points", lambda v: v <= 100 * GAP_TARGET, "centralized - federated <= 2 points"),
        ("lift_points", lambda v: v >= 100 * LIFT_TARGET, "federated - mean local-only >= 10 points"),
    ):
        met = [r["round"] for r in rows if target(r[column])]
        where = f"first met at round {met[0]}" if met else f"not met by round {last['round']}"
        notes.append(f"Target {text}: {where} (round {last['round']}: {last[column]:+.1f} points).")
    best_central = max(r["centralized_macro_f1"] for r in rows)
    notes.append(
        f"Round {last['round']}: FedAvg macro-F1 {100 * last['fedavg_macro_f1']:.1f}, centralized "
        f"{100 * last['centralized_macro_f1']:.1f} (best along the curve {100 * best_central:.1f}), "
        f"mean local-only {100 * last['local_mean_macro_f1']:.1f}, "
        f"best site {100 * last['local_best_macro_f1']:.1f}."
    )
    return notes


def _plot(outcome: Outcome, s: dict[str, Any]) -> None:
    rows, sites = outcome.rows, s["sites"]
    fig, ax = new_figure(7, 4)
    x = [r["round"] for r in rows]
    for column, label, style in (
        ("fedavg_macro_f1", f"FedAvg ({sites} hospitals)", "o-"),
        ("centralized_macro_f1", "centralized (pooled data)", "s-"),
        ("local_mean_macro_f1", "local-only, mean site", "^--"),
        ("local_best_macro_f1", "local-only, best site", "v:"),
    ):
        ax.plot(x, [100 * r[column] for r in rows], style, label=label)
    ax.set_xlabel("round (= epochs of the pooled and local arms: same examples seen)")
    ax.set_ylabel("macro-F1 on the held-out set (points)")
    ax.set_title("ICD-10 chapter, Dirichlet 0.3: the gap over rounds")
    ax.legend(fontsize=8)
    save_figure(fig, NAME, "macro_f1")


BENCHMARK = Benchmark(NAME, settings, measure, COLUMNS, _plot, lambda o, s: target_notes(o.rows))
