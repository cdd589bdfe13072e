"""``fedtune bench head``: where the federated gap is: the shared head vs a head solved from statistics.

The main task under label skew (ICD-10 chapters, 10 hospitals, Dirichlet 0.3, ``max-examples=4000``,
the run-config defaults): one ``fedtune simulate`` run. After every round (and before the first),
the shared adapter is scored twice on the sites' validation splits and on the coordinator's held-out
set:

- **shared head** (baseline): the adapter as the federation built it, its head averaged from the
  sites' heads;
- **solved head** (candidate): the same encoder, with the head solved by LDA
  (:func:`fedtune.common.head_fit.solve_lda`) from the **example-weighted mean of the sites' own
  statistics** (:class:`~fedtune.common.head_fit.HeadStatistics`, each site's over its training
  split). That mean is what secure aggregation computes from the sites' uploads, so the solved head
  is the one a federated head fit would produce; the shrinkage is chosen on validation at each round
  from :data:`SHRINKAGES`.

Reported per round: validation and held-out macro-F1 (and held-out accuracy) of both heads and the
held-out ratio solved / shared. Full: ~20 min on 2 CPU cores (5 rounds of 10 sites, 6 adapters
scored); seeds with ``FEDTUNE_BENCH_SEEDS`` (default 42), ``FEDTUNE_BENCH_RESUME=1`` reuses a saved
seed. Quick: 3 sites, ``max-examples=600``, 2 rounds.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .arms import arms_dir, cached, env_list, federated_arm, resolved
from .figures import new_figure, save_figure
from .spec import Benchmark, Outcome

NAME = "head"
COLUMNS = (
    "seed",
    "round",
    "shared_val_f1",
    "solved_val_f1",
    "shared_test_f1",
    "solved_test_f1",
    "test_f1_ratio",
    "shared_test_acc",
    "solved_test_acc",
    "shrinkage",
)
SHRINKAGES: tuple[float, ...] = (0.0, 0.1, 0.3)


def settings(quick: bool) -> dict[str, Any]:
    """Sites, data size and rounds of the full or quick mode; the seeds of ``$FEDTUNE_BENCH_SEEDS``."""
    s: dict[str, Any] = (
        {"sites": 3, "max_examples": 600, "rounds": 2}
        if quick
        else {"sites": 10, "max_examples": 4000, "rounds": 5}
    )
    return {**s, "seeds": env_list("FEDTUNE_BENCH_SEEDS", [42], int)}


def run_config(s: Mapping[str, Any], seed: int) -> dict[str, Any]:
    """The federated run: the defaults at Dirichlet 0.3, every round's adapter kept (audit)."""
    return {
        "max-examples": s["max_examples"],
        "min-clients": s["sites"],
        "num-server-rounds": s["rounds"],
        "fraction-evaluate": 0.0,
        "partitioning": "dirichlet",
        "dirichlet-alpha": 0.3,
        "audit": "true",
        "seed": seed,
    }


def measure(s: dict[str, Any]) -> Outcome:
    """One federated run per seed (saved runs reused), both heads scored after every round."""
    rows = []
    for seed in s["seeds"]:
        config = run_config(s, seed)
        label = f"seed{seed}"
        result = cached(
            arms_dir(NAME) / f"{label}.json",
            {"sites": s["sites"], "config": resolved(config)},
            lambda config=config, label=label: head_curve(label, config, s["sites"]),
        )
        rows += [{"seed": seed, **p} for p in result["curve"]]
    return Outcome(rows, _notes(rows, s))


def head_curve(label: str, config: Mapping[str, Any], sites: int) -> dict[str, Any]:
    """Run the federation, then score each round's adapter with its shared head and a solved one."""
    from fedtune.common.audit import load_arrays
    from fedtune.common.config import parse_run_config
    from fedtune.common.run_folder import RunFolder

    result = federated_arm(NAME, label, sites, config)
    cfg = parse_run_config(dict(config))
    run = RunFolder(result.out)
    curve = []
    for r in range(cfg.num_server_rounds + 1):  # round 0: the initial adapter
        path = run.global_round(r + 1) if r < cfg.num_server_rounds else run.global_final
        curve.append({"round": r, **score_heads(cfg, sites, load_arrays(path)[0])})
    return {"curve": curve, "seconds": result.seconds}


def score_heads(cfg: Any, sites: int, arrays: list[np.ndarray]) -> dict[str, float]:
    """The adapter ``arrays`` scored with its own head and with the LDA head of the sites' statistics."""
    from fedtune.common.adapters import set_adapter_arrays
    from fedtune.common.head_fit import HeadStatistics, head_inputs, solve_lda
    from fedtune.common.model import bring_up
    from fedtune.common.sites import coordinator_test_set, simulated_site
    from fedtune.common.train import score

    from .curves import scorer
    from .training import bench_threads, concat, torch_threads

    test = coordinator_test_set(cfg)
    data = [simulated_site(cfg, i, sites) for i in range(sites)]
    validation, classes = concat([d.test for d in data]), len(test.label_names)
    parts = bring_up(cfg, classes)
    set_adapter_arrays(parts.model, arrays)
    with torch_threads(bench_threads()):
        shared = {name: scorer(cfg, parts)(ds) for name, ds in (("val", validation), ("test", test))}

        def inputs(ds: Any) -> np.ndarray:
            kw = {"batch_size": cfg.batch_size, "max_length": cfg.max_length, "device": parts.device}
            return head_inputs(parts.model, parts.tokenizer, ds, **kw)

        stats = HeadStatistics.pooled(
            [HeadStatistics.of(inputs(d.train), d.train.labels, classes) for d in data]
        )
        val_x, test_x = inputs(validation), inputs(test)

    def scored(shrinkage: float, x: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        weight, bias = solve_lda(stats, shrinkage)
        logits = x @ weight.T + bias
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        return score(probs / probs.sum(axis=1, keepdims=True), labels, classes).as_metrics()

    best = max(SHRINKAGES, key=lambda lam: scored(lam, val_x, validation.labels)["macro_f1"])
    solved = {"val": scored(best, val_x, validation.labels), "test": scored(best, test_x, test.labels)}
    return {
        "shared_val_f1": shared["val"]["macro_f1"],
        "solved_val_f1": solved["val"]["macro_f1"],
        "shared_test_f1": shared["test"]["macro_f1"],
        "solved_test_f1": solved["test"]["macro_f1"],
        "test_f1_ratio": solved["test"]["macro_f1"] / max(shared["test"]["macro_f1"], 1e-9),
        "shared_test_acc": shared["test"]["accuracy"],
        "solved_test_acc": solved["test"]["accuracy"],
        "shrinkage": best,
    }


def _notes(rows: list[dict[str, Any]], s: Mapping[str, Any]) -> list[str]:
    notes = [
        f"{s['sites']} hospitals, Dirichlet 0.3, max-examples {s['max_examples']}, the run-config defaults, "
        f"{s['rounds']} rounds; seeds {', '.join(map(str, s['seeds']))}. Round 0 is the initial adapter "
        "(the base model's features). `solved`: the LDA head of the example-weighted mean of the sites' "
        "statistics (what secure aggregation computes), its shrinkage chosen on validation from "
        f"{', '.join(map(str, SHRINKAGES))}. Validation = the sites' local splits; test = the "
        "coordinator's held-out set; ratio = solved / shared held-out macro-F1."
    ]
    for seed in s["seeds"]:
        own = [r for r in rows if r["seed"] == seed]
        last = own[-1]
        notes.append(
            f"Seed {seed}, round {last['round']} (the default budget): held-out macro-F1 shared head "
            f"{100 * last['shared_test_f1']:.1f}, solved head {100 * last['solved_test_f1']:.1f} "
            f"({last['test_f1_ratio']:.2f}x); the base model's features alone (round 0) with a solved "
            f"head: {100 * own[0]['solved_test_f1']:.1f}."
        )
    return notes


def plot(outcome: Outcome, s: Mapping[str, Any]) -> None:
    """Held-out (solid) and validation (dashed) macro-F1 of both heads, round by round."""
    if not outcome.rows:
        return
    fig, ax = new_figure(6, 4)
    for seed in s["seeds"]:
        own = [r for r in outcome.rows if r["seed"] == seed]
        x = [r["round"] for r in own]
        for head in ("shared", "solved"):
            (line,) = ax.plot(x, [r[f"{head}_test_f1"] for r in own], "-o", label=f"{head} head, seed {seed}")
            ax.plot(x, [r[f"{head}_val_f1"] for r in own], "--", color=line.get_color())
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("round (0 = initial adapter)")
    ax.set_ylabel("macro-F1 (solid: held-out, dashed: validation)")
    ax.set_title("ICD-10 chapters, Dirichlet 0.3: shared vs solved head")
    ax.legend(fontsize=7)
    save_figure(fig, NAME, "f1")


BENCHMARK = Benchmark(NAME, settings, measure, COLUMNS, plot)
