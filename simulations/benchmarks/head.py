"""``fedtune bench head``: the averaged shared head vs a head solved from the sites' statistics.

The main task under label skew (ICD-10 chapters, 10 hospitals, Dirichlet 0.3, ``max-examples=4000``,
the run-config defaults), two ``fedtune simulate`` runs side by side (:data:`ARMS`):

- **averaged** (baseline, ``head-fit=none``): the shared head is the average of the sites' heads.
  Its adapter after every round (and before the first) is also scored with a **solved** head: the
  same encoder, the head solved by LDA (:func:`fedtune.common.head_fit.solve_lda`) from the
  example-weighted mean of the sites' own statistics (what secure aggregation computes), its
  shrinkage chosen on validation from :data:`SHRINKAGES`: where the gap is (head or encoder);
- **lda** (candidate, ``head-fit=lda``): the federation solves the head from the sites' securely
  aggregated statistics after every round (:mod:`fedtune.server.head_fit`), and the sites train
  their adapters against it.

Reported per round: validation (the sites' local splits) and held-out macro-F1 of each, held-out
accuracy, and the held-out ratio lda / averaged. Full: ~45 min on 2 CPU cores; seeds with
``FEDTUNE_BENCH_SEEDS`` (default 42), ``FEDTUNE_BENCH_RESUME=1`` reuses saved runs. Quick: 3 sites,
``max-examples=600``, 2 rounds.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .arms import arms_dir, cached, env_list, federated_arm, resolved
from .curves import SHRINKAGES, scorer, solved_head_scores
from .figures import new_figure, save_figure
from .spec import Benchmark, Outcome

NAME = "head"
COLUMNS = (
    "seed",
    "round",
    "averaged_val_f1",
    "averaged_test_f1",
    "solved_val_f1",
    "solved_test_f1",
    "lda_val_f1",
    "lda_test_f1",
    "test_f1_ratio",
    "averaged_test_acc",
    "lda_test_acc",
)
ARMS: dict[str, dict[str, Any]] = {"averaged": {"head-fit": "none"}, "lda": {"head-fit": "lda"}}


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
    """Both arms' runs per seed (saved runs reused), their adapters scored after every round."""
    rows = []
    for seed in s["seeds"]:
        runs = {}
        for arm, overrides in ARMS.items():
            config = {**run_config(s, seed), **overrides}
            label = f"seed{seed}-{arm}"
            runs[arm] = cached(
                arms_dir(NAME) / f"{label}.json",
                {"sites": s["sites"], "config": resolved(config)},
                functools.partial(head_curve, label, config, s["sites"], solve=arm == "averaged"),
            )["curve"]
        rows += [_row(seed, base, cand) for base, cand in zip(runs["averaged"], runs["lda"], strict=True)]
    return Outcome(rows, _notes(rows, s))


def _row(seed: int, base: Mapping[str, Any], cand: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "seed": seed,
        "round": base["round"],
        "averaged_val_f1": base["shared_val_f1"],
        "averaged_test_f1": base["shared_test_f1"],
        "solved_val_f1": base["solved_val_f1"],
        "solved_test_f1": base["solved_test_f1"],
        "lda_val_f1": cand["shared_val_f1"],
        "lda_test_f1": cand["shared_test_f1"],
        "test_f1_ratio": cand["shared_test_f1"] / max(base["shared_test_f1"], 1e-9),
        "averaged_test_acc": base["shared_test_acc"],
        "lda_test_acc": cand["shared_test_acc"],
        "shrinkage": base["shrinkage"],
    }


def head_curve(label: str, config: Mapping[str, Any], sites: int, *, solve: bool) -> dict[str, Any]:
    """Run the federation, then score each round's adapter (with ``solve``: also with a solved head)."""
    from fedtune.common.audit import load_arrays
    from fedtune.common.config import parse_run_config
    from fedtune.common.run_folder import RunFolder

    result = federated_arm(NAME, label, sites, config)
    cfg = parse_run_config(dict(config))
    run = RunFolder(result.out)
    paths = [run.global_round(r + 1) for r in range(cfg.num_server_rounds)] + [run.global_final]
    scores = score_heads(cfg, sites, [load_arrays(p)[0] for p in paths], solve=solve)
    curve = [{"round": r, **row} for r, row in enumerate(scores)]  # round 0: the initial adapter
    return {"curve": curve, "seconds": result.seconds}


def score_heads(
    cfg: Any, sites: int, adapters: Sequence[list[np.ndarray]], *, solve: bool = True
) -> list[dict[str, Any]]:
    """Each of ``adapters`` scored with its own head and, with ``solve``, with a solved head.

    The data and the model are loaded once for all of them. Without ``solve`` the solved figures
    are ``None``.
    """
    from fedtune.common.adapters import set_adapter_arrays
    from fedtune.common.model import bring_up
    from fedtune.common.sites import coordinator_test_set, simulated_site

    from .training import bench_threads, concat, torch_threads

    test = coordinator_test_set(cfg)
    data = [simulated_site(cfg, i, sites) for i in range(sites)]
    validation = concat([d.test for d in data])
    parts = bring_up(cfg, len(test.label_names))
    rows = []
    for arrays in adapters:
        set_adapter_arrays(parts.model, arrays)
        with torch_threads(bench_threads()):
            solved = (
                solved_head_scores(cfg, parts, [d.train for d in data], validation, test) if solve else None
            )
            shared = (
                solved["model_head"]  # scored on the features the solve saw: no second pass
                if solved
                else {name: scorer(cfg, parts)(ds) for name, ds in (("val", validation), ("test", test))}
            )
        rows.append(
            {
                "shared_val_f1": shared["val"]["macro_f1"],
                "shared_test_f1": shared["test"]["macro_f1"],
                "shared_test_acc": shared["test"]["accuracy"],
                "solved_val_f1": solved["val"]["macro_f1"] if solved else None,
                "solved_test_f1": solved["test"]["macro_f1"] if solved else None,
                "solved_test_acc": solved["test"]["accuracy"] if solved else None,
                "shrinkage": solved["shrinkage"] if solved else None,
            }
        )
    return rows


def _notes(rows: list[dict[str, Any]], s: Mapping[str, Any]) -> list[str]:
    notes = [
        f"{s['sites']} hospitals, Dirichlet 0.3, max-examples {s['max_examples']}, the run-config defaults, "
        f"{s['rounds']} rounds; seeds {', '.join(map(str, s['seeds']))}. Round 0 is the initial adapter "
        "(the base model's features). `averaged`: head-fit=none; `solved`: the averaged run's encoder "
        "with the LDA head of the example-weighted mean of the sites' statistics (in-process, shrinkage "
        f"chosen on validation from {', '.join(map(str, SHRINKAGES))}); `lda`: head-fit=lda (the "
        "federation solves the head after every round under SecAgg+). Validation = the sites' local "
        "splits; test = the coordinator's held-out set; ratio = lda / averaged held-out macro-F1."
    ]
    for seed in s["seeds"]:
        own = [r for r in rows if r["seed"] == seed]
        last = own[-1]
        best = max(own, key=lambda r: r["lda_val_f1"])
        notes.append(
            f"Seed {seed}, round {last['round']} (the default budget): held-out macro-F1 averaged head "
            f"{100 * last['averaged_test_f1']:.1f}, head-fit=lda {100 * last['lda_test_f1']:.1f} "
            f"({last['test_f1_ratio']:.2f}x; accuracy {last['averaged_test_acc']:.3f} vs "
            f"{last['lda_test_acc']:.3f}); the averaged run's encoder with a solved head "
            f"{100 * last['solved_test_f1']:.1f}; the base model's features with a solved head (round 0) "
            f"{100 * own[0]['solved_test_f1']:.1f}. head-fit=lda at its best validation round "
            f"({best['round']}): {100 * best['lda_test_f1']:.1f}."
        )
    return notes


def plot(outcome: Outcome, s: Mapping[str, Any]) -> None:
    """Held-out (solid) and validation (dashed) macro-F1 of each head, round by round."""
    if not outcome.rows:
        return
    fig, ax = new_figure(6, 4)
    for seed in s["seeds"]:
        own = [r for r in outcome.rows if r["seed"] == seed]
        x = [r["round"] for r in own]
        for head in ("averaged", "solved", "lda"):
            (line,) = ax.plot(x, [r[f"{head}_test_f1"] for r in own], "-o", label=f"{head}, seed {seed}")
            ax.plot(x, [r[f"{head}_val_f1"] for r in own], "--", color=line.get_color())
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("round (0 = initial adapter)")
    ax.set_ylabel("macro-F1 (solid: held-out, dashed: validation)")
    ax.set_title("ICD-10 chapters, Dirichlet 0.3: averaged vs solved head")
    ax.legend(fontsize=7)
    save_figure(fig, NAME, "f1")


BENCHMARK = Benchmark(NAME, settings, measure, COLUMNS, plot)
