"""Validation curves for the quality benchmarks: every arm scored after each round (epoch).

The **validation set** of a simulated federation is the union of the sites' local splits
(``test-fraction`` of each site's partition): the sites never train on it and the coordinator never
sees it. The coordinator's held-out test set is scored beside it and never used to choose. Used by
``fedtune bench tuning`` (choosing the recipe) and ``fedtune bench quality`` (the fair protocol).

A curve is a list of points ``{"step", "val_macro_f1", "val_accuracy", "test_macro_f1",
"test_accuracy"}``, one per round (federated) or epoch (centralized); :func:`summary` reads its
best-validation point and its point at the default budget.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from fedtune.common.model import bring_up
from fedtune.common.run_folder import RunFolder

from .arms import federated_arm
from .stats import mean_std
from .training import concat, head_features, predict, train_central

if TYPE_CHECKING:
    from fedtune.common.config import FedConfig
    from fedtune.common.data import TextDataset
    from fedtune.common.model import ModelParts

Curve = list[dict[str, float]]
SHRINKAGES: tuple[float, ...] = (0.0, 0.1, 0.3)  # a solved head's shrinkage, chosen on validation


def sets(cfg: FedConfig, sites: int) -> tuple[TextDataset, TextDataset, TextDataset]:
    """``(pooled training splits, validation = pooled local splits, held-out test set)``."""
    from fedtune.common.sites import coordinator_test_set, simulated_site

    data = [simulated_site(cfg, i, sites) for i in range(sites)]
    return concat([d.train for d in data]), concat([d.test for d in data]), coordinator_test_set(cfg)


def scorer(cfg: FedConfig, parts: ModelParts) -> Callable[[TextDataset], dict[str, float]]:
    """``score(dataset) -> metrics`` of ``parts.model`` as it is then, with the run config's settings."""
    from fedtune.common.train import score as score_probs

    def score(ds: TextDataset) -> dict[str, float]:
        return score_probs(predict(cfg, parts, ds), ds.labels, len(ds.label_names)).as_metrics()

    return score


def point(step: int, val: Mapping[str, float], test: Mapping[str, Any]) -> dict[str, float]:
    """One curve point from the validation and held-out metrics after ``step``."""
    return {
        "step": step,
        "val_macro_f1": val["macro_f1"],
        "val_accuracy": val["accuracy"],
        "test_macro_f1": test["macro_f1"],
        "test_accuracy": test["accuracy"],
    }


def federated_curve(bench: str, arm: str, run_config: Mapping[str, Any], sites: int) -> dict[str, Any]:
    """Run ``fedtune simulate``; score the shared adapter after every round on the validation set.

    The adapter after round r is the audit's ``global-round-(r+1).npz`` (``global-final.npz`` after
    the last round), so ``run_config`` needs ``audit=true``; the held-out score per round is the
    coordinator's own (``metrics.json``).
    """
    from fedtune.common.adapters import set_adapter_arrays
    from fedtune.common.audit import load_arrays
    from fedtune.common.config import parse_run_config

    result = federated_arm(bench, arm, sites, run_config)
    cfg = parse_run_config(dict(run_config))
    _, validation, _ = sets(cfg, sites)
    parts = bring_up(cfg, len(validation.label_names))
    score = scorer(cfg, parts)
    run = RunFolder(result.out)
    curve: Curve = []
    for record in result.records[1:]:  # record 0 is the initial adapter
        r = record.round
        path = run.global_round(r + 1) if r < cfg.num_server_rounds else run.global_final
        set_adapter_arrays(parts.model, load_arrays(path)[0])
        curve.append(point(r, score(validation), record.to_json()))
    return {"curve": curve, "seconds": result.seconds}


def centralized_curve(run_config: Mapping[str, Any], sites: int, epochs: int) -> dict[str, Any]:
    """Centralized PEFT on the pooled training splits, scored on both sets after every epoch.

    When the run config solves the head (``head-fit=lda``), the curve scores the encoder of each
    epoch with the LDA head of the pooled training data's statistics (:func:`solved_head_scores`,
    the centralized counterpart of a federation that solves its head); the trained head's scores
    are kept beside it as ``trained_head_curve``. Training itself is the same either way.
    """
    from fedtune.common.config import parse_run_config

    cfg = parse_run_config(dict(run_config))
    pool, validation, test = sets(cfg, sites)
    parts = bring_up(cfg, len(pool.label_names))
    score = scorer(cfg, parts)
    solve = cfg.solves_head(len(pool.label_names))
    curve: Curve = []
    trained: Curve = []

    def on_epoch_end(epoch: int) -> None:
        if not solve:
            curve.append(point(epoch, score(validation), score(test)))
            return
        solved = solved_head_scores(cfg, parts, [pool], validation, test)  # one pass scores both heads
        trained.append(point(epoch, solved["model_head"]["val"], solved["model_head"]["test"]))
        curve.append({**point(epoch, solved["val"], solved["test"]), "shrinkage": solved["shrinkage"]})

    res = train_central(cfg, parts, pool, epochs=epochs, on_epoch_end=on_epoch_end)
    return {"curve": curve, "seconds": res.seconds, **({"trained_head_curve": trained} if solve else {})}


def solved_head_scores(
    cfg: FedConfig,
    parts: ModelParts,
    trains: Sequence[TextDataset],
    validation: TextDataset,
    test: TextDataset,
) -> dict[str, Any]:
    """Scores of ``parts.model``'s encoder with the LDA head of ``trains``' pooled statistics.

    The statistics are each training set's (:class:`~fedtune.common.head_fit.HeadStatistics`, what
    secure aggregation sums), pooled; the shrinkage is chosen on ``validation`` from
    :data:`SHRINKAGES`. The model's own head is left as it is and scored on the same features (one
    forward pass per set serves both heads). Returns ``{"val": metrics, "test": metrics,
    "shrinkage": chosen, "model_head": {"val": metrics, "test": metrics}}``.
    """
    from fedtune.common.head_fit import HeadStatistics, solve_lda
    from fedtune.common.model import head_layer
    from fedtune.common.train import score

    classes = len(test.label_names)

    stats = HeadStatistics.pooled(
        [HeadStatistics.of(head_features(cfg, parts, ds), ds.labels, classes) for ds in trains]
    )
    features = {
        split: (head_features(cfg, parts, ds), ds.labels)
        for split, ds in (("val", validation), ("test", test))
    }

    def scored(head: tuple[np.ndarray, np.ndarray], split: str) -> dict[str, float]:
        (weight, bias), (x, labels) = head, features[split]
        logits = x @ weight.T + bias
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        return score(probs / probs.sum(axis=1, keepdims=True), labels, classes).as_metrics()

    solved = {lam: solve_lda(stats, lam) for lam in SHRINKAGES}
    best = max(SHRINKAGES, key=lambda lam: scored(solved[lam], "val")["macro_f1"])
    layer = head_layer(parts.model)
    own = (layer.weight.detach().float().cpu().numpy(), layer.bias.detach().float().cpu().numpy())
    return {
        "val": scored(solved[best], "val"),
        "test": scored(solved[best], "test"),
        "shrinkage": best,
        "model_head": {split: scored(own, split) for split in ("val", "test")},
    }


def summary(arm: str, curve: Curve, budget: int) -> dict[str, Any]:
    """The best-validation point of a curve and its point at the default ``budget`` (else its end).

    ``test_f1_late``: its held-out macro-F1 averaged over the points from ``budget`` on (else its end),
    a reading of a flat, noisy curve that no single validation pick decides.
    """
    best = max(curve, key=lambda p: p["val_macro_f1"])
    at = next((p for p in curve if p["step"] == budget), curve[-1])
    late = [p["test_macro_f1"] for p in curve if p["step"] >= budget] or [curve[-1]["test_macro_f1"]]
    return {
        "arm": arm,
        "best": int(best["step"]),
        "val_f1_best": best["val_macro_f1"],
        "test_f1_best": best["test_macro_f1"],
        "test_acc_best": best["test_accuracy"],
        "val_f1_budget": at["val_macro_f1"],
        "test_f1_budget": at["test_macro_f1"],
        "test_acc_budget": at["test_accuracy"],
        "test_f1_late": float(np.mean(late)),
    }


def over_seeds(arm: str, per_seed: Mapping[int, Curve], budget: int) -> dict[str, Any]:
    """:func:`summary` of each seed's curve, averaged; ``seeds`` and ``val_f1_budget_std`` beside them."""
    runs = [summary(arm, curve, budget) for curve in per_seed.values()]
    row: dict[str, Any] = {"arm": arm, "seeds": len(runs)}
    for key in runs[0]:
        if key != "arm":
            row[key] = float(np.mean([r[key] for r in runs]))
    row["val_f1_budget_std"] = mean_std([r["val_f1_budget"] for r in runs])[1]
    return row


def mean_curve(curves: Iterable[Curve], key: str) -> tuple[list[float], list[float]]:
    """``(steps, mean of key at each step)`` over curves; a step only some curves reach averages those."""
    values: dict[float, list[float]] = {}
    for curve in curves:
        for p in curve:
            values.setdefault(p["step"], []).append(p[key])
    steps = sorted(values)
    return steps, [float(np.mean(values[step])) for step in steps]
