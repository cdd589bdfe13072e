"""``fedtune bench quality``: federated PEFT against centralized PEFT and against training alone.

The fair protocol. Task ``icd10-chapter`` (22 chapters), 10 hospitals, ``max-examples=4000``, LoRA r=8,
the local recipe ``fedtune bench tuning`` chose on validation data (the run-config defaults). Every
arm is scored after each round (epoch) on a **validation set carved from the sites' data** (the union
of their local splits, which no arm trains on) and on the coordinator's **held-out test set**, and is
judged at two points chosen without the test set: its **best validation point** and the **default
budget** (round / epoch 5). For every partition and seed:

- **federated** (``strategy`` in :data:`STRATEGIES`, its server settings at their defaults, which
  ``bench tuning`` chose on validation): one ``fedtune simulate`` of up to ``max_rounds`` rounds
  (:func:`~fedtune.simulations.benchmarks.curves.federated_curve`) per setting of
  :data:`FEDERATED_GRID` (local steps per round, learning rate); the setting with the best
  validation macro-F1 is the arm's, chosen per seed and per judging point;
- **centralized**: the same model and training loop on the pooled training splits for up to
  ``max_epochs`` epochs, once per setting of :data:`CENTRAL_GRID` (learning rate, label prior, and
  ``head-fit=lda``: each epoch's encoder also scored with the pooled data's LDA head, the
  counterpart of a federation that solves its head, its trained head's curve a candidate beside
  it); the setting with the best validation macro-F1 is the arm's, chosen per seed and per judging
  point;
- **local-only**: each site alone with the federation's recipe (its local steps per round, learning
  rate and own label prior; a fresh optimiser each round), for up to ``local_rounds`` rounds, judged
  on its own local split (what a hospital alone can use) and scored on the held-out set at its best
  round and at the budget. ``local-mean`` is the mean over sites; ``local-best`` the site that scores
  best on the held-out set (a reference, not a choice).

Reported: held-out macro-F1 and accuracy at both points, mean ± std over seeds, the step chosen,
and the validation curves (``results/quality_curves.png``). Targets (``TARGET_GAPS``): federated
within 3 macro-F1 points of centralized at Dirichlet 0.3 (1.5 at IID, 5 at specialty), at least 10
above the mean local-only site, and at the budget at least 80% of centralized after as many epochs.

Running a subset
    The full protocol (5 partitions x 3 seeds; 50 rounds x 7 federated settings, 20 epochs x 5
    centralized settings, 10 sites x 10 local rounds) takes about 16 hours per partition and seed on
    2 CPU cores (a 30-step round about 2.5 minutes, a 10-step round about 1, 20 centralized epochs
    20-30 minutes), ~240 hours in all.
    Choose with ``FEDTUNE_BENCH_PARTITIONS``, ``FEDTUNE_BENCH_STRATEGIES``, ``FEDTUNE_BENCH_SEEDS``,
    ``FEDTUNE_BENCH_FEDERATED``, ``FEDTUNE_BENCH_CENTRAL`` (comma-separated names), leave the
    local-only arms out with ``FEDTUNE_BENCH_LOCAL=0``, and shorten with
    ``FEDTUNE_BENCH_MAX_ROUNDS`` / ``FEDTUNE_BENCH_MAX_EPOCHS`` (the notes then say the protocol was
    cut). Every arm's result is saved in ``results/arms/quality/``; ``FEDTUNE_BENCH_RESUME=1`` reuses
    an arm saved with the same settings, and ``FEDTUNE_BENCH_SAVED_ONLY=1`` computes nothing and lists
    the arms not run yet.

Quick: 3 sites, ``max-examples=600``, Dirichlet 0.3, 1 seed, 3 rounds / epochs, budget 2.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from typing import Any

from fedtune.common import options

from .arms import arms_dir, choose, env_list, resolved, reuse_or_run
from .curves import Curve, centralized_curve, federated_curve
from .quality_report import plot, report
from .spec import Benchmark, Outcome

NAME = "quality"
COLUMNS = (
    "partition",
    "arm",
    "seeds",
    "best",
    "macro_f1_best",
    "accuracy_best",
    "macro_f1_budget",
    "accuracy_budget",
)
Plan = dict[str, tuple[str, dict[str, Any], Callable[[], dict[str, Any]]]]  # arm -> (label, key, compute)
PARTITIONS: dict[str, dict[str, Any]] = {
    "iid": {"partitioning": "iid"},
    "dirichlet-1.0": {"partitioning": "dirichlet", "dirichlet-alpha": 1.0},
    "dirichlet-0.3": {"partitioning": "dirichlet", "dirichlet-alpha": 0.3},
    "dirichlet-0.1": {"partitioning": "dirichlet", "dirichlet-alpha": 0.1},
    "specialty": {"partitioning": "specialty"},
}
STRATEGIES: tuple[str, ...] = tuple(options.STRATEGIES)
SEEDS: tuple[int, ...] = (42, 43, 44)
# federated local recipes (the rest of the recipe at its defaults); validation picks one per strategy
# and seed: fewer local steps per round drift less under label skew, a lower rate is steadier, and
# head-fit=lda solves the shared head from the sites' statistics instead of averaging it (at the
# default 5e-3, at centralized's 2e-3, and decayed to 0 over the rounds run by a cosine), and
# local-head=frozen has the sites train their adapters against that shared head of all classes
FEDERATED_GRID: dict[str, dict[str, Any]] = {
    "s30-lr5e-3": {"local-steps": 30, "learning-rate": 5e-3},
    "s10-lr5e-3": {"local-steps": 10, "learning-rate": 5e-3},
    "s30-lr2e-3": {"local-steps": 30, "learning-rate": 2e-3},
    "s30-lr5e-3-lda": {"local-steps": 30, "learning-rate": 5e-3, "head-fit": "lda"},
    "s30-lr2e-3-lda": {"local-steps": 30, "learning-rate": 2e-3, "head-fit": "lda"},
    "s30-lr5e-3-lda-cosine": {
        "local-steps": 30,
        "learning-rate": 5e-3,
        "head-fit": "lda",
        "lr-schedule": "cosine",
    },
    "s30-lr5e-3-lda-frozen-head": {
        "local-steps": 30,
        "learning-rate": 5e-3,
        "head-fit": "lda",
        "local-head": "frozen",
    },
}
# centralized settings; validation picks one per seed (the pooled label prior when logit-adjusted)
CENTRAL_GRID: dict[str, dict[str, Any]] = {
    "lr5e-3": {"learning-rate": 5e-3, "label-skew": "none"},
    "lr2e-3": {"learning-rate": 2e-3, "label-skew": "none"},
    "lr5e-3-la": {"learning-rate": 5e-3, "label-skew": "logit-adjust"},
    "lr2e-3-la": {"learning-rate": 2e-3, "label-skew": "logit-adjust"},
    # the centralized counterpart of head-fit=lda: each epoch's encoder with the pooled data's LDA head
    "lr2e-3-la-lda": {"learning-rate": 2e-3, "label-skew": "logit-adjust", "head-fit": "lda"},
}


def settings(quick: bool) -> dict[str, Any]:
    """Sites, data size, rounds, epochs and the default arms of the full or quick mode."""
    if quick:
        return {
            "sites": 3,
            "max_examples": 600,
            "budget": 2,
            "max_rounds": 3,
            "max_epochs": 3,
            "local_rounds": 3,
            "partitions": ["dirichlet-0.3"],
            "strategies": ["fedavg"],
            "federated": ["s30-lr5e-3"],
            "central": ["lr5e-3"],
            "seeds": [42],
        }
    return {
        "sites": 10,
        "max_examples": 4000,
        "budget": 5,
        "max_rounds": 50,
        "max_epochs": 20,
        "local_rounds": 10,
        "partitions": list(PARTITIONS),
        "strategies": ["fedavg"],
        "federated": list(FEDERATED_GRID),
        "central": list(CENTRAL_GRID),
        "seeds": list(SEEDS),
    }


def chosen_settings(quick: bool) -> dict[str, Any]:
    """:func:`settings` with the ``FEDTUNE_BENCH_*`` choices applied and checked."""
    s = settings(quick)
    s["partitions"] = choose(
        "FEDTUNE_BENCH_PARTITIONS", env_list("FEDTUNE_BENCH_PARTITIONS", s["partitions"]), list(PARTITIONS)
    )
    s["strategies"] = choose(
        "FEDTUNE_BENCH_STRATEGIES", env_list("FEDTUNE_BENCH_STRATEGIES", s["strategies"]), list(STRATEGIES)
    )
    s["federated"] = choose(
        "FEDTUNE_BENCH_FEDERATED", env_list("FEDTUNE_BENCH_FEDERATED", s["federated"]), list(FEDERATED_GRID)
    )
    s["central"] = choose(
        "FEDTUNE_BENCH_CENTRAL", env_list("FEDTUNE_BENCH_CENTRAL", s["central"]), list(CENTRAL_GRID)
    )
    s["protocol"] = {"max_rounds": s["max_rounds"], "max_epochs": s["max_epochs"], "seeds": len(s["seeds"])}
    for key, var in (("max_rounds", "FEDTUNE_BENCH_MAX_ROUNDS"), ("max_epochs", "FEDTUNE_BENCH_MAX_EPOCHS")):
        s[key] = min(s[key], *env_list(var, [s[key]], int))
        if s[key] < s["budget"]:
            raise ValueError(f"${var}={s[key]}: must be at least the default budget, {s['budget']}.")
    s["seeds"] = env_list("FEDTUNE_BENCH_SEEDS", s["seeds"], int)
    local = os.environ.get("FEDTUNE_BENCH_LOCAL", "1")
    if local not in ("0", "1"):
        raise ValueError(
            f"$FEDTUNE_BENCH_LOCAL={local!r}: must be 1 (run the local-only arms) or 0 (leave them out)."
        )
    s["local"] = local == "1"
    return s


def measure(s: dict[str, Any]) -> Outcome:
    """Every chosen arm per partition and seed (saved arms reused); rows, targets and notes."""
    missing: list[str] = []  # with FEDTUNE_BENCH_SAVED_ONLY=1: arms not saved yet

    # per_seed[partition][seed][arm] -> {"curve": ...} (federated, centralized) or {"sites": ...}
    per_seed: dict[str, dict[int, dict[str, Any]]] = {}
    for part in s["partitions"]:
        for seed in s["seeds"]:
            arms = per_seed.setdefault(part, {}).setdefault(seed, {})
            base = _base_config(s, part, seed)
            for name, (label, key, compute) in _arm_plan(s, part, seed, base).items():
                result = reuse_or_run(arms_dir(NAME) / f"{label}.json", key, compute, missing)
                if result is not None:
                    arms[name] = result
    rows, notes = report(per_seed, s)
    if missing:
        notes.append(f"Not run yet (assembled from saved arms only): {', '.join(missing)}.")
    return Outcome(rows, notes, {"per_seed": per_seed, "missing": missing})


def _base_config(s: Mapping[str, Any], part: str, seed: int) -> dict[str, Any]:
    return {
        "max-examples": s["max_examples"],
        "min-clients": s["sites"],
        "num-server-rounds": s["max_rounds"],
        "fraction-evaluate": 0.0,  # the sites' own scores are not compared here
        "seed": seed,
        # pinned: the centralized and local arms aggregate nothing, and their saved results stay
        # valid when the default strategy changes (federated arms name theirs)
        "strategy": "fedavg",
        "head-fit": "none",  # pinned likewise; a federated setting that solves the head names it
        **PARTITIONS[part],
    }


def _arm_plan(s: Mapping[str, Any], part: str, seed: int, base: dict[str, Any]) -> Plan:
    """``{arm: (saved file's label, key, compute)}`` for one partition and seed, in running order."""
    sites = s["sites"]
    plan: Plan = {}
    for strategy in s["strategies"]:
        for setting in s["federated"]:
            config = {**base, "strategy": strategy, "audit": "true", **FEDERATED_GRID[setting]}
            label = f"{part}-seed{seed}-{strategy}-{setting}"
            plan[f"{strategy}-{setting}"] = (
                label,
                {"sites": sites, "config": resolved(config)},
                functools.partial(federated_curve, NAME, label, config, sites),
            )
    for setting in s["central"]:
        config = {**base, **CENTRAL_GRID[setting]}
        # the federation's rounds do not touch a centralized arm: one saved arm serves every max_rounds
        central = {k: v for k, v in resolved(config).items() if k != "num-server-rounds"}
        plan[f"centralized-{setting}"] = (
            f"{part}-seed{seed}-centralized-{setting}",
            {"sites": sites, "epochs": s["max_epochs"], "config": central},
            functools.partial(centralized_curve, config, sites, s["max_epochs"]),
        )
    if not s.get("local", True):
        return plan
    # a site alone runs its own rounds: they, not the federation's, are what its schedule spans
    alone = {**base, "num-server-rounds": s["local_rounds"]}
    plan["local"] = (
        f"{part}-seed{seed}-local",
        {"sites": sites, "rounds": s["local_rounds"], "budget": s["budget"], "config": resolved(alone)},
        functools.partial(local_only, alone, sites, s["local_rounds"], s["budget"]),
    )
    return plan


def local_only(run_config: Mapping[str, Any], sites: int, rounds: int, budget: int) -> dict[str, Any]:
    """Each site alone: the federation's local recipe for ``rounds`` rounds, never aggregated.

    A site keeps its own adapter from round to round (a fresh optimiser each round, like a site of
    the federation) and is judged on its own local split; the held-out set scores it at its best
    round and at round ``budget``.
    """
    from fedtune.common.adapters import get_adapter_arrays, set_adapter_arrays
    from fedtune.common.config import parse_run_config
    from fedtune.common.model import bring_up
    from fedtune.common.sites import coordinator_test_set, simulated_site
    from fedtune.common.train import train_local

    from .curves import scorer
    from .training import bench_threads, torch_threads

    cfg = parse_run_config(dict(run_config))
    test = coordinator_test_set(cfg)
    results = []
    for i in range(sites):
        site = simulated_site(cfg, i, sites)
        parts = bring_up(cfg, len(test.label_names))  # the seeded initial adapter, as at round 1
        model, score = parts.model, scorer(cfg, parts)
        curve: Curve = []
        kept: dict[int, Any] = {}
        for r in range(1, rounds + 1):
            with torch_threads(bench_threads()):
                train_local(
                    model,
                    parts.tokenizer,
                    site.train,
                    cfg,
                    device=parts.device,
                    seed=cfg.seed + r,
                    server_round=r,
                )
            val = score(site.test)
            curve.append({"step": r, "val_macro_f1": val["macro_f1"], "val_accuracy": val["accuracy"]})
            kept[r] = get_adapter_arrays(model)
        best = int(max(curve, key=lambda p: p["val_macro_f1"])["step"])
        site_result: dict[str, Any] = {"train_examples": len(site.train), "best": best, "curve": curve}
        for point, r in (("best", best), ("budget", min(budget, rounds))):
            set_adapter_arrays(model, kept[r])
            held_out = score(test)
            site_result[f"test_f1_{point}"] = held_out["macro_f1"]
            site_result[f"test_acc_{point}"] = held_out["accuracy"]
            site_result[f"test_loss_{point}"] = held_out["loss"]
        results.append(site_result)
        print(f"local-only site {i}: best round {best}, held-out macro-F1 {site_result['test_f1_best']:.3f}")
    return {"sites": results}


BENCHMARK = Benchmark(NAME, chosen_settings, measure, COLUMNS, plot)
