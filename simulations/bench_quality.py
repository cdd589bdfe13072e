"""``fedtune bench quality``: federated PEFT against centralized PEFT and against training alone.

Task ``icd10-chapter`` (22 chapters), the project's default data size (``max-examples=4000``), LoRA
r=8, 5 rounds x 1 local epoch, 10 hospitals. For every partition and seed:

- **federated**: ``fedtune simulate`` with ``strategy`` = fedavg, fedprox, fedadam (their default
  settings, e.g. ``fedadam-eta=0.001``), scored by the coordinator on its held-out set;
- **centralized**: the same PEFT model and training loop (:func:`fedtune.common.train.train`),
  in-process, on the union of the sites' training splits for ``rounds x local-epochs`` epochs, so it
  sees as many examples as the federation; scored on the same held-out set
  (:func:`fedtune.common.sites.coordinator_test_set`);
- **local-only**: each site trains alone on its own training split for the same number of epochs and
  is scored on the same held-out set; ``local-mean`` is the mean over sites, ``local-best`` the best;
- **centralized-steps** (a diagnostic): centralized PEFT given the federation's sequential optimiser
  steps instead of its examples (rounds x a site's mean steps per round, batches drawn from the
  pooled data), to show how much of the gap the step count alone explains.

Every arm starts from the same seeded initial adapter. Partitions: ``iid``, ``dirichlet-1.0``,
``dirichlet-0.3``, ``dirichlet-0.1``, ``specialty``; seeds 42, 43, 44 (the seed also draws the
subsample, the held-out set and the partition). Reported: accuracy and macro-F1, mean ± std over
seeds. Targets (at Dirichlet alpha = 0.3): federated within 2 macro-F1 points of centralized and at
least 10 points above the mean local-only site.

Running a subset
    The full grid is 5 partitions x 3 seeds x (3 federated runs + centralized + 10 local trainings +
    centralized-steps): 45 federated runs of ~2.5 min each plus ~8 min of in-process training per
    partition and seed, so ~4 hours on 2 otherwise idle CPU cores (a GPU shortens the training part
    only). Pick arms with environment
    variables (comma-separated), or call
    ``run(quick, partitions=..., strategies=..., seeds=...)``::

        export FEDTUNE_BENCH_PARTITIONS=dirichlet-0.3 FEDTUNE_BENCH_STRATEGIES=fedavg
        FEDTUNE_BENCH_SEEDS=42 fedtune bench quality

    Each arm's result is kept in ``results/work/quality/arms/``; with ``FEDTUNE_BENCH_RESUME=1`` an arm
    already computed with the same settings is reused, so the grid can be run in parts and assembled
    by a final run over every arm. ``results/quality.json`` holds the arms of the last invocation.
    ``FEDTUNE_BENCH_SAVED_ONLY=1`` computes nothing: it reports the saved arms of the chosen grid and
    lists the ones not run yet (a grid still in progress, as it stands).

Quick: 1 seed, ``iid`` and ``dirichlet-0.3``, fedavg only, 4 sites, 2 rounds, ``max-examples=800``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .bench import (
    cached,
    choose,
    concat,
    env_list,
    federated_arm,
    mean_std,
    new_figure,
    pm,
    resolved,
    save_figure,
    saved,
    saved_only,
    train_and_score,
    work_dir,
)
from .benchmarking import write_results

NAME = "quality"
PARTITIONS: dict[str, dict[str, Any]] = {
    "iid": {"partitioning": "iid"},
    "dirichlet-1.0": {"partitioning": "dirichlet", "dirichlet-alpha": 1.0},
    "dirichlet-0.3": {"partitioning": "dirichlet", "dirichlet-alpha": 0.3},
    "dirichlet-0.1": {"partitioning": "dirichlet", "dirichlet-alpha": 0.1},
    "specialty": {"partitioning": "specialty"},
}
STRATEGIES: tuple[str, ...] = ("fedavg", "fedprox", "fedadam")
SEEDS: tuple[int, ...] = (42, 43, 44)
ARMS: tuple[str, ...] = (*STRATEGIES, "centralized", "centralized-steps", "local-mean", "local-best")
TARGET_PARTITION = "dirichlet-0.3"


def settings(quick: bool) -> dict[str, Any]:
    """Sites, rounds, data size and the default arms of the full or quick mode."""
    if quick:
        return {
            "sites": 4,
            "rounds": 2,
            "local_epochs": 1,
            "max_examples": 800,
            "partitions": ["iid", "dirichlet-0.3"],
            "strategies": ["fedavg"],
            "seeds": [42],
        }
    return {
        "sites": 10,
        "rounds": 5,
        "local_epochs": 1,
        "max_examples": 4000,
        "partitions": list(PARTITIONS),
        "strategies": list(STRATEGIES),
        "seeds": list(SEEDS),
    }


def run(
    quick: bool,
    *,
    partitions: Sequence[str] | None = None,
    strategies: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
) -> Path:
    """Run the chosen arms; write ``results/quality.{json,md}`` and ``results/quality_*.png``."""
    s = settings(quick)
    partitions = choose(
        "FEDTUNE_BENCH_PARTITIONS",
        partitions or env_list("FEDTUNE_BENCH_PARTITIONS", s["partitions"]),
        list(PARTITIONS),
    )
    strategies = choose(
        "FEDTUNE_BENCH_STRATEGIES",
        strategies or env_list("FEDTUNE_BENCH_STRATEGIES", s["strategies"]),
        list(STRATEGIES),
    )
    seeds = list(seeds or env_list("FEDTUNE_BENCH_SEEDS", s["seeds"], int))
    epochs = s["rounds"] * s["local_epochs"]
    missing: list[str] = []  # with FEDTUNE_BENCH_SAVED_ONLY=1: arms not saved yet

    def reuse_or_run(
        path: Path, key: dict[str, Any], compute: Callable[[], dict[str, Any]]
    ) -> dict[str, Any] | None:
        if not saved_only():
            return cached(path, key, compute)
        result = saved(path, key)
        if result is None:
            missing.append(path.stem)
        return result

    # results[partition][arm] -> one {accuracy, macro_f1} per seed
    results: dict[str, dict[str, list[dict[str, float]]]] = {}
    # at the target partition, per seed: (a site's mean optimiser steps per round, centralized's per epoch)
    steps: list[tuple[float, int]] = []
    for part in partitions:
        for seed in seeds:
            run_config = {
                "num-server-rounds": s["rounds"],
                "local-epochs": s["local_epochs"],
                "max-examples": s["max_examples"],
                "min-clients": s["sites"],
                "fraction-evaluate": 0.0,  # the sites' own scores are not compared here
                "audit": "false",
                "seed": seed,
                **PARTITIONS[part],
            }
            arms = results.setdefault(part, {})
            key = {"sites": s["sites"], "run_config": run_config}
            folder = work_dir(NAME) / "arms"
            for strategy in strategies:
                label = f"{part}-seed{seed}-{strategy}"

                def federated(
                    label: str = label, strategy: str = strategy, run_config: dict[str, Any] = run_config
                ) -> dict[str, Any]:
                    arm = federated_arm(NAME, label, s["sites"], {**run_config, "strategy": strategy})
                    return {
                        "accuracy": arm.final["accuracy"],
                        "macro_f1": arm.final["macro_f1"],
                        "seconds": arm.seconds,
                    }

                config = resolved({**run_config, "strategy": strategy})
                result = reuse_or_run(
                    folder / f"{label}.json", {**key, "strategy": strategy, "config": config}, federated
                )
                if result is not None:
                    arms.setdefault(strategy, []).append(result)
            pooled = reuse_or_run(
                folder / f"{part}-seed{seed}-pooled.json",
                {**key, "epochs": epochs, "config": resolved(run_config)},
                lambda run_config=run_config: _pooled_arms(run_config, s["sites"], epochs),
            )
            budget = reuse_or_run(
                folder / f"{part}-seed{seed}-central-steps.json",
                {**key, "rounds": s["rounds"], "config": resolved(run_config)},
                lambda run_config=run_config: _step_budget_arm(run_config, s["sites"], s["rounds"]),
            )
            if budget is not None:
                arms.setdefault("centralized-steps", []).append(budget)
            if pooled is None:
                continue
            arms.setdefault("centralized", []).append(pooled["centralized"])
            local = pooled["local"]
            arms.setdefault("local-mean", []).append(
                {k: sum(x[k] for x in local) / len(local) for k in ("accuracy", "macro_f1")}
            )
            best = max(local, key=lambda x: x["macro_f1"])
            arms.setdefault("local-best", []).append({k: best[k] for k in ("accuracy", "macro_f1")})
            if part == TARGET_PARTITION:
                from fedtune.common.config import parse_run_config
                from fedtune.common.local_plan import steps_per_round

                cfg = parse_run_config(run_config)
                site = [steps_per_round(x["train_examples"], cfg) for x in local]
                central = math.ceil(pooled["centralized"]["train_examples"] / cfg.batch_size)
                steps.append((sum(site) / len(site), central))

    rows = []
    for part, arms in results.items():
        for arm, runs in sorted(arms.items(), key=lambda item: ARMS.index(item[0])):
            acc, acc_sd = mean_std([r["accuracy"] for r in runs])
            f1, f1_sd = mean_std([r["macro_f1"] for r in runs])
            rows.append(
                {
                    "partition": part,
                    "arm": arm,
                    "seeds": len(runs),
                    "accuracy_mean": acc,
                    "accuracy_std": acc_sd,
                    "macro_f1_mean": f1,
                    "macro_f1_std": f1_sd,
                    "accuracy": pm(acc, acc_sd),
                    "macro_f1": pm(f1, f1_sd),
                }
            )
    notes = [
        f"{s['sites']} hospitals, {s['rounds']} rounds x {s['local_epochs']} local epoch(s), "
        f"max-examples {s['max_examples']}, LoRA r=8, seeds {', '.join(map(str, seeds))}; "
        "every arm scored on the coordinator's held-out set. Centralized and local-only train in-process "
        f"for {epochs} epochs (= rounds x local epochs, the examples the federation sees).",
        *_target_notes(results),
        *_steps_note(steps, s["rounds"], epochs),
        *_budget_note(results),
        *_gap_note(results),
    ]
    if missing:
        notes.append(f"Not run yet (assembled from saved arms only): {', '.join(missing)}.")
    _plot(rows, "macro_f1", "macro-F1")
    _plot(rows, "accuracy", "accuracy")
    return write_results(
        NAME,
        rows,
        columns=["partition", "arm", "accuracy", "macro_f1", "seeds"],
        notes=notes,
        extra={
            "settings": {**s, "partitions": partitions, "strategies": strategies, "seeds": seeds},
            "per_seed": results,
            "missing": missing,
        },
        quick=quick,
    )


def _pooled_arms(run_config: dict[str, Any], sites: int, epochs: int) -> dict[str, Any]:
    """Centralized PEFT on the union of the sites' training splits, and each site alone."""
    from fedtune.common.config import parse_run_config
    from fedtune.common.sites import coordinator_test_set, simulated_site

    cfg = parse_run_config(run_config)
    test = coordinator_test_set(cfg)
    trains = [simulated_site(cfg, i, sites).train for i in range(sites)]
    keys = ("accuracy", "macro_f1", "train_examples", "train_seconds")
    central = train_and_score(cfg, concat(trains), test, epochs=epochs)
    local = [
        {k: v for k, v in train_and_score(cfg, t, test, epochs=epochs).items() if k in keys} for t in trains
    ]
    return {"centralized": {k: central[k] for k in keys}, "local": local}


def _step_budget_arm(run_config: dict[str, Any], sites: int, rounds: int) -> dict[str, Any]:
    """Centralized PEFT given FedAvg's sequential optimiser steps instead of its examples.

    ``rounds`` x a site's mean steps per round (``ceil(examples / batch) x local-epochs``), each a
    batch drawn from the pooled training data (one optimiser, seeded permutations of the pool
    concatenated): the same number of sequential steps as the federation's shared adapter takes.
    """
    import numpy as np
    from fedtune.common.config import parse_run_config
    from fedtune.common.local_plan import steps_per_round
    from fedtune.common.sites import coordinator_test_set, simulated_site

    cfg = parse_run_config(run_config)
    trains = [simulated_site(cfg, i, sites).train for i in range(sites)]
    site_steps = [steps_per_round(len(t), cfg) for t in trains]
    steps = round(rounds * sum(site_steps) / len(site_steps))
    pool, examples = concat(trains), steps * cfg.batch_size
    rng = np.random.default_rng(cfg.seed)
    order = np.concatenate([rng.permutation(len(pool)) for _ in range(math.ceil(examples / len(pool)))])
    res = train_and_score(cfg, pool.subset(order[:examples]), coordinator_test_set(cfg), epochs=1)
    keys = ("accuracy", "macro_f1", "examples_seen")
    return {**{k: res[k] for k in keys}, "steps": steps}


def _mean_f1(arms: dict[str, list[dict[str, float]]], arm: str) -> float:
    """Mean macro-F1 of ``arm`` over its seeds."""
    return mean_std([r["macro_f1"] for r in arms[arm]])[0]


def _target_notes(results: dict[str, dict[str, list[dict[str, float]]]]) -> list[str]:
    arms = results.get(TARGET_PARTITION, {})
    if "centralized" not in arms:
        return [f"Targets are judged at {TARGET_PARTITION}, whose baselines this run did not include."]
    central = _mean_f1(arms, "centralized")
    local = _mean_f1(arms, "local-mean")
    notes = []
    for strategy in STRATEGIES:
        if strategy not in arms:
            continue
        fed = _mean_f1(arms, strategy)
        gap, lift = 100 * (central - fed), 100 * (fed - local)
        notes.append(
            f"{TARGET_PARTITION}, {strategy}: macro-F1 {100 * fed:.1f}; centralized {100 * central:.1f}, "
            f"centralized - federated = {gap:+.1f} points (target <= 2: {'met' if gap <= 2 else 'missed'}); "
            f"mean local-only {100 * local:.1f}, federated - local = {lift:+.1f} points (target >= 10: "
            f"{'met' if lift >= 10 else 'missed'})."
        )
    notes.append("`fedtune bench rounds` follows FedAvg, centralized and local-only over 20 rounds here.")
    return notes


def _steps_note(steps: list[tuple[float, int]], rounds: int, epochs: int) -> list[str]:
    """What limits FedAvg at equal examples seen: its sequential optimiser steps, from the data sizes."""
    if not steps:
        return []
    site = sum(x for x, _ in steps) / len(steps)
    central = sum(c for _, c in steps) / len(steps)
    return [
        f"What limits federated here: at equal examples seen it makes far fewer sequential optimiser "
        f"steps. At {TARGET_PARTITION} a site takes {site:.1f} AdamW steps per round on average "
        f"({rounds * site:.0f} over the run, a fresh optimiser each round) and the shared adapter moves "
        f"by the average of the sites' moves; centralized takes {central:.0f} steps per epoch "
        f"({epochs * central:.0f} in all, one optimiser): {central / site:.1f}x as many. The gap by "
        "partition below shows whether label skew adds to it."
    ]


def _budget_note(results: dict[str, dict[str, list[dict[str, float]]]]) -> list[str]:
    """FedAvg against centralized given FedAvg's sequential steps, by partition."""
    parts = []
    for part, arms in results.items():
        if "fedavg" in arms and "centralized-steps" in arms:
            fed = _mean_f1(arms, "fedavg")
            budget = _mean_f1(arms, "centralized-steps")
            steps, _ = mean_std([r["steps"] for r in arms["centralized-steps"]])
            parts.append(f"{part} {100 * budget:.1f} vs {100 * fed:.1f} ({steps:.0f} steps)")
    if not parts:
        return []
    return [
        "Centralized given FedAvg's sequential steps instead of its examples (`centralized-steps`: rounds "
        "x a site's mean steps per round, batches drawn from the pooled data) vs FedAvg, macro-F1 by "
        f"partition: {', '.join(parts)}. Where the two are close, the step count, not the federation, "
        "sets FedAvg's score; where centralized-steps is far ahead, the sites' label skew costs the rest."
    ]


def _gap_note(results: dict[str, dict[str, list[dict[str, float]]]]) -> list[str]:
    """Centralized - FedAvg macro-F1 by partition (is the gap there without label skew too?)."""
    gaps = []
    for part, arms in results.items():
        if "fedavg" in arms and "centralized" in arms:
            fed = _mean_f1(arms, "fedavg")
            central = _mean_f1(arms, "centralized")
            seeds = min(len(arms["fedavg"]), len(arms["centralized"]))
            gaps.append(f"{part} {100 * (central - fed):+.1f} ({seeds} seed{'s' if seeds > 1 else ''})")
    return [f"Centralized - FedAvg, macro-F1 points, by partition: {', '.join(gaps)}."] if gaps else []


def _plot(rows: list[dict[str, Any]], metric: str, label: str) -> None:
    import numpy as np

    parts = list(dict.fromkeys(r["partition"] for r in rows))
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    fig, ax = new_figure(max(6.0, 1.6 * len(parts) + 2), 4)
    width = 0.8 / len(arms)
    x = np.arange(len(parts))
    for i, arm in enumerate(arms):
        by_part = {r["partition"]: r for r in rows if r["arm"] == arm}
        means = [by_part[p][f"{metric}_mean"] if p in by_part else np.nan for p in parts]
        stds = [by_part[p][f"{metric}_std"] if p in by_part else 0.0 for p in parts]
        ax.bar(x + (i - (len(arms) - 1) / 2) * width, means, width, yerr=stds, capsize=2, label=arm)
    ax.set_xticks(x, parts)
    ax.set_ylabel(f"{label} (held-out set)")
    ax.set_title(f"ICD-10 chapter: {label}, mean ± std over seeds")
    ax.legend(fontsize=7, ncol=3)
    save_figure(fig, NAME, metric)
