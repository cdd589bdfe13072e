"""``fedtune bench tuning``: choose the local recipe and the server optimiser on validation data.

The quality benchmark's target setting (10 hospitals, Dirichlet 0.3 over the ICD-10 chapters,
``max-examples=4000``, LoRA r=8), seed 42 (a grid may use one seed; the final quality table uses
three), more seeds for the arms a choice hangs on. Every arm is judged on a **validation set carved
from the sites' data**: the union of the sites' local splits (``test-fraction`` of each site's
partition, which the sites never train on and the coordinator never sees). The coordinator's
held-out test set is reported beside it, never used to choose.

- **Federated arms** (:data:`FEDERATED`): ``fedtune simulate`` with the arm's overrides; the shared
  adapter after every round (the audit's ``global-round-NNN.npz`` files) is scored on the validation
  set in-process; the held-out score per round is the coordinator's own (``metrics.json``).
- **Centralized arms** (:data:`CENTRALIZED`): the same PEFT model and training loop on the union of
  the sites' training splits, scored on both sets after every epoch.

Reported per arm: the round (epoch) with the best validation macro-F1, the validation and held-out
macro-F1 there, and both at the default budget (round / epoch ``rounds``); the validation curves are
plotted. Pick arms with ``FEDTUNE_BENCH_ARMS`` (comma-separated names), seeds with
``FEDTUNE_BENCH_SEEDS`` (a row is the mean over the seeds its arm has); ``FEDTUNE_BENCH_RESUME=1``
reuses saved arms and ``FEDTUNE_BENCH_SAVED_ONLY=1`` assembles the table from them alone (an arm
run at more seeds than another, for a choice that needs them, is so reported beside the grid).

Full: 5 rounds (centralized: 10 epochs), 9-15 min per federated arm and ~9 min per centralized arm on
2 CPU cores (~3 h for the default arms at one seed).
Quick: 3 sites, 2 rounds, ``max-examples=600``, two federated arms and one centralized arm.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from .arms import arms_dir, choose, env_list, resolved, reuse_or_run
from .curves import Curve, centralized_curve, federated_curve, mean_curve, over_seeds
from .figures import new_figure, save_figure
from .spec import Benchmark, Outcome

NAME = "tuning"
COLUMNS = (
    "arm",
    "seeds",
    "best",
    "val_f1_best",
    "test_f1_best",
    "val_f1_budget",
    "val_f1_budget_std",
    "test_f1_budget",
    "test_acc_budget",
)
# the local recipe: label-skew correction, local work per round, peak rate and its schedule
OLD = {
    "label-skew": "none",
    "local-epochs": 1,
    "local-steps": 0,
    "learning-rate": 5e-3,
    "lr-schedule": "constant",
}
LA3 = {"label-skew": "logit-adjust", "local-epochs": 3, "local-steps": 0, "lr-schedule": "cosine"}
LA30 = {"label-skew": "logit-adjust", "local-steps": 30, "lr-schedule": "cosine"}
CHOSEN = {**LA30, "learning-rate": 5e-3, "lr-schedule": "constant"}  # the defaults this benchmark chose
FEDERATED: dict[str, dict[str, Any]] = {
    "fedavg-old-defaults": {"strategy": "fedavg", **OLD},
    "fedavg-la-e3-lr2e-3": {"strategy": "fedavg", **LA3, "learning-rate": 2e-3},
    "fedavg-la-s30-lr2e-3": {"strategy": "fedavg", **LA30, "learning-rate": 2e-3},
    "fedavg-la-s30-lr5e-3-const": {"strategy": "fedavg", **CHOSEN},
    "fedavg-la-b16-s60-lr5e-3-const": {"strategy": "fedavg", **CHOSEN, "batch-size": 16, "local-steps": 60},
    "fedavg-none-s30-lr5e-3-const": {"strategy": "fedavg", **CHOSEN, "label-skew": "none"},
    "fedavg-la-s30-lr1e-2-const": {"strategy": "fedavg", **CHOSEN, "learning-rate": 1e-2},
    "fedavg-la-s30-lr5e-3-const-ffa": {"strategy": "fedavg", **CHOSEN, "lora-variant": "ffa"},
    "fedadam-eta1e-2-la-s30-lr5e-3-const": {
        "strategy": "fedadam",
        **CHOSEN,
        "fedopt-eta": 1e-2,
        "fedopt-tau": 1e-3,
    },
    # not run yet: the other corrections, server optimisers and prefix tuning at the chosen recipe
    "fedavg-fedrs-s30-lr5e-3-const": {"strategy": "fedavg", **CHOSEN, "label-skew": "restricted-softmax"},
    "fedavgm-m0.5-la-s30-lr5e-3-const": {
        "strategy": "fedavgm",
        **CHOSEN,
        "fedavgm-lr": 1.0,
        "fedavgm-momentum": 0.5,
    },
    "fedavgm-m0.8-la-s30-lr5e-3-const": {
        "strategy": "fedavgm",
        **CHOSEN,
        "fedavgm-lr": 1.0,
        "fedavgm-momentum": 0.8,
    },
    "fedavgm-lr2-m0-la-s30-lr5e-3-const": {
        "strategy": "fedavgm",
        **CHOSEN,
        "fedavgm-lr": 2.0,
        "fedavgm-momentum": 0.0,
    },
    "fedavg-la-s30-lr2e-3-const": {"strategy": "fedavg", **CHOSEN, "learning-rate": 2e-3},
    "fedyogi-eta1e-2-la-s30-lr5e-3-const": {
        "strategy": "fedyogi",
        **CHOSEN,
        "fedopt-eta": 1e-2,
        "fedopt-tau": 1e-3,
    },
    "prefix-la-s30-lr5e-3-const": {"strategy": "fedavg", **CHOSEN, "peft-method": "prefix"},
    "prefix-la-s30-lr1e-2-const": {
        "strategy": "fedavg",
        **CHOSEN,
        "peft-method": "prefix",
        "learning-rate": 1e-2,
    },
    "prefix-mlp-la-s30-lr5e-3-const": {
        "strategy": "fedavg",
        **CHOSEN,
        "peft-method": "prefix",
        "prefix-projection": True,
    },
    # the head solved by the federation (head-fit=lda, bench head), LoRA and prefix tuning alike
    "fedavg-la-s30-lr5e-3-const-lda": {"strategy": "fedavg", **CHOSEN, "head-fit": "lda"},
    "prefix-la-s30-lr5e-3-const-lda": {
        "strategy": "fedavg",
        **CHOSEN,
        "peft-method": "prefix",
        "head-fit": "lda",
    },
    "prefix-la-s30-lr1e-2-const-lda": {
        "strategy": "fedavg",
        **CHOSEN,
        "peft-method": "prefix",
        "learning-rate": 1e-2,
        "head-fit": "lda",
    },
}
# prefix tuning is judged against LoRA with the same recipe, FedAvg and the same way of making the head
LORA_REFERENCE: dict[str, str] = {
    "none": "fedavg-la-s30-lr5e-3-const",
    "lda": "fedavg-la-s30-lr5e-3-const-lda",
}
CENTRALIZED: dict[str, dict[str, Any]] = {
    "centralized-lr5e-3": {"label-skew": "none", "learning-rate": 5e-3, "lr-schedule": "constant"},
    "centralized-lr2e-3": {"label-skew": "none", "learning-rate": 2e-3, "lr-schedule": "constant"},
    "centralized-la-lr2e-3-cos": {
        "label-skew": "logit-adjust",
        "learning-rate": 2e-3,
        "lr-schedule": "cosine",
    },
}
DEFAULT_ARMS = (
    "fedavg-la-e3-lr2e-3",
    "fedavg-la-s30-lr2e-3",
    "fedavg-la-s30-lr2e-3-const",
    "fedavg-la-s30-lr5e-3-const",
    "fedavg-la-b16-s60-lr5e-3-const",
    "fedavg-none-s30-lr5e-3-const",
    "fedavg-la-s30-lr1e-2-const",
    "fedavg-la-s30-lr5e-3-const-ffa",
    "fedadam-eta1e-2-la-s30-lr5e-3-const",
    "fedavgm-m0.5-la-s30-lr5e-3-const",
    "fedavgm-m0.8-la-s30-lr5e-3-const",
    "fedavgm-lr2-m0-la-s30-lr5e-3-const",
    "prefix-la-s30-lr5e-3-const",
    "prefix-la-s30-lr1e-2-const",
    "fedavg-la-s30-lr5e-3-const-lda",
    "prefix-la-s30-lr5e-3-const-lda",
    "prefix-la-s30-lr1e-2-const-lda",
    "centralized-lr5e-3",
)


def settings(quick: bool) -> dict[str, Any]:
    """Sites, rounds, centralized epochs, data size, seeds and arms of the full or quick mode."""
    if quick:
        return {
            "sites": 3,
            "rounds": 2,
            "epochs": 2,
            "max_examples": 600,
            "seeds": [42],
            "arms": ["fedavg-old-defaults", "fedavg-la-e3-lr2e-3", "centralized-lr2e-3"],
        }
    return {
        "sites": 10,
        "rounds": 5,
        "epochs": 10,
        "max_examples": 4000,
        "seeds": [42],
        "arms": list(DEFAULT_ARMS),
    }


def chosen_settings(quick: bool) -> dict[str, Any]:
    """:func:`settings` with the arms of ``$FEDTUNE_BENCH_ARMS`` and the seeds of ``$FEDTUNE_BENCH_SEEDS``."""
    s = settings(quick)
    s["arms"] = choose(
        "FEDTUNE_BENCH_ARMS", env_list("FEDTUNE_BENCH_ARMS", s["arms"]), [*FEDERATED, *CENTRALIZED]
    )
    s["seeds"] = env_list("FEDTUNE_BENCH_SEEDS", s["seeds"], int)
    return s


def measure(s: dict[str, Any]) -> Outcome:
    """Every chosen arm's validation curve at each seed (saved arms reused), averaged over the seeds."""
    missing: list[str] = []  # with FEDTUNE_BENCH_SAVED_ONLY=1: arms not saved yet
    curves: dict[str, dict[int, Curve]] = {}
    for arm in s["arms"]:
        for seed in s["seeds"]:
            key, compute = _plan(arm, seed, s)
            result = reuse_or_run(arms_dir(NAME) / f"{arm}-seed{seed}.json", key, compute, missing)
            if result is not None:
                curves.setdefault(arm, {})[seed] = result["curve"]
    rows = [over_seeds(arm, per_seed, s["rounds"]) for arm, per_seed in curves.items()]
    notes = [
        f"{s['sites']} hospitals, Dirichlet 0.3, max-examples {s['max_examples']}, LoRA r=8 unless named, "
        f"seeds {', '.join(map(str, s['seeds']))} (a row is the mean over the seeds its arm has, `seeds`; "
        f"`val_f1_budget_std` their spread); federated {s['rounds']} rounds, centralized {s['epochs']} "
        "epochs. Validation = the union of the sites' local splits (never trained on); held-out = the "
        "coordinator's test set, shown, never used to choose.",
        "`best` is the round (epoch) of the best validation macro-F1 (mean over seeds); `budget` columns "
        f"are round (epoch) {s['rounds']}.",
    ]
    if missing:
        notes.append(f"Not run yet (assembled from saved arms only): {', '.join(missing)}.")
    return Outcome(rows, notes, {"curves": curves, "missing": missing})


def _plan(arm: str, seed: int, s: Mapping[str, Any]) -> tuple[dict[str, Any], Callable[[], dict[str, Any]]]:
    """``(saved result's key, compute)`` of one arm at one seed."""
    base = {
        "max-examples": s["max_examples"],
        "min-clients": s["sites"],
        "num-server-rounds": s["rounds"],
        "partitioning": "dirichlet",
        "dirichlet-alpha": 0.3,
        "fraction-evaluate": 0.0,
        "seed": seed,
        "strategy": "fedavg",  # pinned for the centralized arms (federated arms name theirs), see quality
        "head-fit": "none",  # the local recipe is chosen with the sites' averaged head (bench head: lda)
    }
    if arm in FEDERATED:
        config = {**base, **FEDERATED[arm], "audit": "true"}
        return {"sites": s["sites"], "config": resolved(config)}, lambda: federated_curve(
            NAME, arm, config, s["sites"]
        )
    config = {**base, **CENTRALIZED[arm]}
    key = {"sites": s["sites"], "epochs": s["epochs"], "config": resolved(config)}
    return key, lambda: centralized_curve(config, s["sites"], s["epochs"])


def choice_notes(rows: list[dict[str, Any]]) -> list[str]:
    """Which federated and centralized arms validation picks, and the targets judged on them.

    Federated: the best validation macro-F1 at the default budget (what a user runs); centralized:
    the best validation macro-F1 at the same number of epochs, and at its best epoch. Held-out
    figures are only reported for the arms validation picked.
    """
    fed = [r for r in rows if r["arm"] in FEDERATED]
    central = [r for r in rows if r["arm"] in CENTRALIZED]
    if not fed or not central:
        return []
    prefix = [r for r in fed if FEDERATED[r["arm"]].get("peft-method") == "prefix"]
    fed = [r for r in fed if r not in prefix]  # the default is chosen among LoRA arms
    f = max(fed, key=lambda r: r["val_f1_budget"])
    c_budget = max(central, key=lambda r: r["val_f1_budget"])
    c_best = max(central, key=lambda r: r["val_f1_best"])
    ratio = f["test_f1_budget"] / c_budget["test_f1_budget"]
    gap = 100 * (c_best["test_f1_best"] - f["test_f1_best"])
    return [
        f"Validation picks `{f['arm']}` (validation macro-F1 {f['val_f1_budget']:.3f} at the budget; "
        f"held-out {f['test_f1_budget']:.3f}, accuracy {f['test_acc_budget']:.3f}) and centralized "
        f"`{c_budget['arm']}` at the same number of epochs (held-out {c_budget['test_f1_budget']:.3f}).",
        f"Target at the default budget, federated >= 80% of centralized after the same number of epochs: "
        f"{100 * ratio:.0f}% ({'met' if ratio >= 0.8 else 'missed'}).",
        f"Best validation points: federated round {f['best']} held-out {f['test_f1_best']:.3f}; centralized "
        f"`{c_best['arm']}` epoch {c_best['best']} held-out {c_best['test_f1_best']:.3f}: centralized - "
        f"federated = {gap:+.1f} points (target <= 3: {'met' if gap <= 3 else 'missed'}; federated is "
        "limited to the rounds run here). Centralized here is this grid's (a trained head); the fair "
        "comparison, centralized with its own settings chosen on validation and a solved head as well, "
        "is `fedtune bench quality`'s.",
        *_prefix_note(prefix, rows),
    ]


def _prefix_note(prefix: list[dict[str, Any]], rows: list[dict[str, Any]]) -> list[str]:
    """Prefix tuning against LoRA at the budget, one note per way of making the head (``head-fit``).

    Among the prefix arms with a head-fit, validation picks one; it is compared with
    :data:`LORA_REFERENCE`'s LoRA arm of the same head-fit (same recipe, FedAvg).
    """
    notes = []
    for head_fit, reference in LORA_REFERENCE.items():
        lora = next((r for r in rows if r["arm"] == reference), None)
        own = [r for r in prefix if FEDERATED[r["arm"]].get("head-fit", "none") == head_fit]
        if not own or lora is None:
            continue
        p = max(own, key=lambda r: r["val_f1_budget"])
        gap = 100 * (lora["test_f1_budget"] - p["test_f1_budget"])
        notes.append(
            f"Prefix tuning, head-fit={head_fit} (validation picks `{p['arm']}`: validation "
            f"{p['val_f1_budget']:.3f}, held-out {p['test_f1_budget']:.3f} at the budget) vs LoRA with the "
            f"same recipe and FedAvg (`{reference}`: {lora['val_f1_budget']:.3f} / "
            f"{lora['test_f1_budget']:.3f}): LoRA - prefix = {gap:+.1f} held-out points "
            f"(target <= 5: {'met' if gap <= 5 else 'missed'})."
        )
    return notes


def _plot(outcome: Outcome, s: dict[str, Any]) -> None:
    curves: Mapping[str, Mapping[int, Curve]] = outcome.extra["curves"]
    fig, ax = new_figure(7, 4.5)
    for arm, per_seed in curves.items():
        steps, val = mean_curve(per_seed.values(), "val_macro_f1")
        ax.plot(steps, val, "--" if arm in CENTRALIZED else "-", marker="o", label=arm)
    ax.set_xlabel("round (federated) / epoch (centralized)")
    ax.set_ylabel("validation macro-F1 (mean over seeds)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_title("ICD-10 chapters, Dirichlet 0.3")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    save_figure(fig, NAME, "curves")


BENCHMARK = Benchmark(NAME, chosen_settings, measure, COLUMNS, _plot, lambda o, s: choice_notes(o.rows))
