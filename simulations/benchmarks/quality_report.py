"""Tables, target notes and plots of ``fedtune bench quality`` (see :mod:`.bench_quality`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .curves import summary
from .figures import new_figure, save_figure
from .spec import Outcome, Settings
from .stats import mean_std, pm

TARGET_GAPS: dict[str, float] = {"dirichlet-0.3": 3.0, "iid": 1.5, "specialty": 5.0}  # macro-F1 points
LIFT_PARTITION, LIFT_TARGET = "dirichlet-0.3", 10.0  # points above the mean local-only site
BUDGET_RATIO = 0.8  # federated / centralized macro-F1 at the default budget
Judged = dict[str, dict[str, Any]]  # arm -> its figures at the best point and at the budget


def arm_summaries(arms: Mapping[str, Any], budget: int, grids: Mapping[str, Sequence[str]]) -> Judged:
    """One partition and seed's arms judged at their best-validation point and at the budget.

    ``grids`` maps each judged arm (a strategy, ``centralized``) to its settings; the run of setting
    ``x`` is saved as arm ``"{arm}-{x}"``. An arm is its setting with the best validation macro-F1,
    chosen separately at the best point and at the budget (named in ``setting_best`` /
    ``setting_budget``); a centralized run that solved its head also offers its trained head's curve
    as setting ``"{x}-trained-head"``. Local-only: ``local-mean`` (mean over sites, each at its own
    best round) and ``local-best`` (the site best on the held-out set, a reference).
    """
    out: Judged = {}
    for arm, grid in grids.items():
        runs = [
            summary(name, arms[f"{arm}-{x}"][key], budget)
            for x in grid
            if f"{arm}-{x}" in arms
            for name, key in ((x, "curve"), (f"{x}-trained-head", "trained_head_curve"))
            if key in arms[f"{arm}-{x}"]
        ]
        if runs:
            at_best = max(runs, key=lambda r: r["val_f1_best"])
            at_budget = max(runs, key=lambda r: r["val_f1_budget"])
            out[arm] = {
                **{k: at_best[k] for k in ("best", "val_f1_best", "test_f1_best", "test_acc_best")},
                "test_f1_late": at_best["test_f1_late"],
                **{k: at_budget[k] for k in ("val_f1_budget", "test_f1_budget", "test_acc_budget")},
                "setting_best": at_best["arm"],
                "setting_budget": at_budget["arm"],
            }
    if "local" in arms:
        sites = arms["local"]["sites"]
        keys = ("best", "test_f1_best", "test_acc_best", "test_f1_budget", "test_acc_budget")
        out["local-mean"] = {k: sum(x[k] for x in sites) / len(sites) for k in keys}
        top = max(sites, key=lambda x: x["test_f1_best"])
        out["local-best"] = {k: top[k] for k in keys}
    return out


def grids(s: Mapping[str, Any]) -> dict[str, list[str]]:
    """The judged arms of settings ``s`` and the settings each chooses from (see :func:`arm_summaries`)."""
    return {
        **{strategy: list(s["federated"]) for strategy in s["strategies"]},
        "centralized": list(s["central"]),
    }


def report(
    per_seed: Mapping[str, Mapping[int, Mapping[str, Any]]], s: Mapping[str, Any]
) -> tuple[list[dict[str, Any]], list[str]]:
    """``(rows, notes)``: every arm by partition, mean ± std over seeds, and the targets."""
    judged = {
        part: {seed: arm_summaries(arms, s["budget"], grids(s)) for seed, arms in seeds.items()}
        for part, seeds in per_seed.items()
    }
    rows = [_row(part, arm, runs) for part, seeds in judged.items() for arm, runs in _by_arm(seeds).items()]
    notes = [
        f"{s['sites']} hospitals, max-examples {s['max_examples']}, LoRA r=8, default recipe; seeds "
        f"{', '.join(map(str, s['seeds']))}. Federated up to {s['max_rounds']} rounds (settings "
        f"{', '.join(s['federated'])}, one chosen per seed on validation), centralized up to "
        f"{s['max_epochs']} epochs (settings {', '.join(s['central'])}, one chosen per seed on validation), "
        f"each site alone up to {s['local_rounds']} rounds of its local steps. `best`: the round (epoch) of "
        "the best validation macro-F1 (validation = the sites' local splits; a site alone: its own split); "
        f"`budget`: round (epoch) {s['budget']}, the default. Macro-F1 and accuracy on the held-out set.",
        *protocol_cut(s),
        *(note for part, seeds in judged.items() for note in _target_notes(part, _by_arm(seeds), s)),
    ]
    return rows, notes


def plot(outcome: Outcome, s: Settings) -> None:
    """Every arm's validation curves (``quality_curves.png``) and the bars (``quality_macro_f1.png``)."""
    _plot_curves(outcome.extra["per_seed"], s)
    _plot_bars(outcome.rows)


def protocol_cut(s: Mapping[str, Any]) -> list[str]:
    """What of the protocol this invocation left out (rounds, epochs, seeds), as a note."""
    cut = [
        f"{what} {s[key]} of {s['protocol'][key]}"
        for key, what in (("max_rounds", "federated rounds"), ("max_epochs", "centralized epochs"))
        if s[key] < s["protocol"][key]
    ]
    if len(s["seeds"]) < s["protocol"]["seeds"]:
        cut.append(f"{len(s['seeds'])} seed(s) of {s['protocol']['seeds']}")
    if not s.get("local", True):
        cut.append("the local-only arms left out ($FEDTUNE_BENCH_LOCAL=0)")
    return [f"Protocol cut to fit the machine: {'; '.join(cut)}."] if cut else []


def _by_arm(seeds: Mapping[int, Judged]) -> dict[str, list[dict[str, Any]]]:
    """``{arm: [its figures, and ``seed``, for each seed that has it]}``, arms in first-seen order."""
    out: dict[str, list[dict[str, Any]]] = {}
    for seed in sorted(seeds):
        for arm, figures in seeds[seed].items():
            out.setdefault(arm, []).append({**figures, "seed": seed})
    return out


def _row(part: str, arm: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    row: dict[str, Any] = {"partition": part, "arm": arm, "seeds": len(runs)}
    row["best"] = round(mean_std([r["best"] for r in runs])[0], 1)
    for point in ("best", "budget"):
        for metric, key in (("macro_f1", "test_f1"), ("accuracy", "test_acc")):
            mean, std = mean_std([r[f"{key}_{point}"] for r in runs])
            row[f"{metric}_{point}_mean"], row[f"{metric}_{point}_std"] = mean, std
            row[f"{metric}_{point}"] = pm(mean, std)
    if "setting_best" in runs[0]:
        row["settings"] = sorted({r["setting_best"] for r in runs})
    return row


def _f1(runs: list[dict[str, Any]], point: str) -> float:
    return mean_std([r[f"test_f1_{point}"] for r in runs])[0]


def _target_notes(part: str, arms: Mapping[str, list[dict[str, Any]]], s: Mapping[str, Any]) -> list[str]:
    """The gap, lift and budget targets at ``part`` for every federated arm that has centralized beside it."""
    if "centralized" not in arms:
        return []
    central = arms["centralized"]
    notes = []
    for arm in s["strategies"]:
        if arm not in arms:
            continue
        fed = arms[arm]
        gap = 100 * (_f1(central, "best") - _f1(fed, "best"))
        chosen = ", ".join(sorted({r["setting_best"] for r in fed}))
        text = f"{part}, {arm} ({chosen}): macro-F1 at the best validation point "
        text += f"{100 * _f1(fed, 'best'):.1f} (round "
        text += f"{mean_std([r['best'] for r in fed])[0]:.0f}), centralized {100 * _f1(central, 'best'):.1f}"
        text += f" (epoch {mean_std([r['best'] for r in central])[0]:.0f}): gap {gap:+.1f} points"
        if part in TARGET_GAPS:
            text += f" (target <= {TARGET_GAPS[part]:g}: {'met' if gap <= TARGET_GAPS[part] else 'missed'})"
        if part == LIFT_PARTITION and "local-mean" in arms:
            lift = 100 * (_f1(fed, "best") - _f1(arms["local-mean"], "best"))
            text += f"; mean local-only site {100 * _f1(arms['local-mean'], 'best'):.1f}, lift {lift:+.1f}"
            text += f" (target >= {LIFT_TARGET:g}: {'met' if lift >= LIFT_TARGET else 'missed'})"
        ratio = _f1(fed, "budget") / _f1(central, "budget")
        text += f". At the budget: {100 * _f1(fed, 'budget'):.1f} vs centralized after {s['budget']} epochs "
        text += f"{100 * _f1(central, 'budget'):.1f} = {100 * ratio:.0f}% "
        text += f"(target >= {100 * BUDGET_RATIO:.0f}%: "
        text += f"{'met' if ratio >= BUDGET_RATIO else 'missed'})."
        text += _late_note(fed, central, s) + _paired_note(fed, central)
        if any(r["best"] == s["max_rounds"] for r in fed):
            text += f" Its best validation point is its last round: still rising at round {s['max_rounds']}."
        notes.append(text)
    return notes


def _late_note(fed: list[dict[str, Any]], central: list[dict[str, Any]], s: Mapping[str, Any]) -> str:
    """Both sides' held-out macro-F1 averaged from the budget on (each seed's chosen setting)."""
    fed_late, central_late = _f1(fed, "late"), _f1(central, "late")
    return (
        f" Averaged from the budget on (rounds {s['budget']}-{s['max_rounds']}, epochs {s['budget']}-"
        f"{s['max_epochs']}; no single validation pick decides it): {100 * fed_late:.1f} vs "
        f"{100 * central_late:.1f}, gap {100 * (central_late - fed_late):+.1f} points."
    )


def _paired_note(fed: list[dict[str, Any]], central: list[dict[str, Any]]) -> str:
    """The gap at the best validation point seed by seed, and the standard error of its mean.

    Only the seeds both sides have count; with fewer than two there is no spread and no note.
    """
    central_f1 = {r["seed"]: r["test_f1_best"] for r in central}
    paired = [
        (r["seed"], 100 * (central_f1[r["seed"]] - r["test_f1_best"])) for r in fed if r["seed"] in central_f1
    ]
    if len(paired) < 2:
        return ""
    seeds, gaps = zip(*paired, strict=True)
    error = mean_std(gaps)[1] / len(gaps) ** 0.5
    return (
        f" Seed by seed ({', '.join(map(str, seeds))}): gap {', '.join(f'{g:+.1f}' for g in gaps)} points; "
        f"standard error of the mean gap {error:.1f} points."
    )


def _plot_curves(per_seed: Mapping[str, Mapping[int, Mapping[str, Any]]], s: Mapping[str, Any]) -> None:
    """Validation macro-F1 per round (epoch), mean over seeds, one panel per partition."""
    import numpy as np

    parts = list(per_seed)
    if not parts:
        return
    fig, axes = new_figure(5.0 * len(parts), 4.0, ncols=len(parts))
    for ax, part in zip(np.atleast_1d(axes), parts, strict=True):
        curves: dict[str, list[list[float]]] = {}
        for arms in per_seed[part].values():
            for name, result in arms.items():
                if "curve" in result:
                    curves.setdefault(name, []).append([p["val_macro_f1"] for p in result["curve"]])
        for name, runs in curves.items():
            length = min(len(c) for c in runs)
            mean = np.mean([c[:length] for c in runs], axis=0)
            style = "--" if name.startswith("centralized-") else "-"
            ax.plot(np.arange(1, length + 1), mean, style, label=name)
        ax.axvline(s["budget"], color="grey", linewidth=0.8, linestyle=":")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("round (federated) / epoch (centralized)")
        ax.set_ylabel("validation macro-F1")
        ax.set_title(part)
        ax.legend(fontsize=7)
    save_figure(fig, "quality", "curves")


def _plot_bars(rows: list[dict[str, Any]]) -> None:
    """Held-out macro-F1 of every arm at its best validation point and at the budget."""
    import numpy as np

    if not rows:
        return
    fig, ax = new_figure(max(6.0, 0.7 * len(rows) + 2), 4)
    x = np.arange(len(rows))
    for offset, point in ((-0.2, "best"), (0.2, "budget")):
        means = [r[f"macro_f1_{point}_mean"] for r in rows]
        stds = [r[f"macro_f1_{point}_std"] for r in rows]
        ax.bar(x + offset, means, 0.4, yerr=stds, capsize=2, label=f"at the {point} point")
    ax.set_xticks(x, [f"{r['partition']}\n{r['arm']}" for r in rows], fontsize=7)
    ax.set_ylabel("macro-F1 (held-out set)")
    ax.set_title("ICD-10 chapters: mean ± std over seeds")
    ax.legend(fontsize=7)
    save_figure(fig, "quality", "macro_f1")
