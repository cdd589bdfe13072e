"""The audit report as a person reads it: ``audit/report.md`` section by section, and its plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

CORRELATION_MASKED = 0.1  # |correlation| below this for every site and round = masked


def _figure():  # noqa: ANN202 - (figure, axes)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(6.4, 3.6))


def _save(fig: Any, plot_dir: Path, name: str) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(plot_dir / name, dpi=110)
    plt.close(fig)
    return name


def _bytes_per_site(report: dict[str, Any], plot_dir: Path) -> str:
    sites = report["tensors_exchanged"]["per_site"]
    fig, ax = _figure()
    x = np.arange(len(sites))
    ax.bar(x - 0.2, [v["up"] / 1e6 for v in sites.values()], 0.4, label="site -> server")
    ax.bar(x + 0.2, [v["down"] / 1e6 for v in sites.values()], 0.4, label="server -> site")
    names = [f"node …{n[-4:]}" for n in sites]
    ax.set(xticks=x, xticklabels=names, ylabel="MB (whole run)", title="Bytes exchanged per site")
    ax.legend(fontsize=8)
    return _save(fig, plot_dir, "bytes_per_site.png")


def _secagg_correlation(report: dict[str, Any], plot_dir: Path) -> str:
    rows = report["secagg"]["per_site_round"]
    fig, ax = _figure()
    ax.scatter([r["round"] for r in rows], [r["correlation"] for r in rows])
    ax.axhline(0, color="grey", lw=0.8)
    ax.set(
        ylim=(-1.05, 1.05),
        xlabel="round",
        ylabel="correlation",
        title="What the server received vs true updates",
    )
    return _save(fig, plot_dir, "secagg_correlation.png")


def _mia_scores(mia: dict[str, Any], plot_dir: Path) -> str:
    fig, ax = _figure()
    scores, members = mia["_scores"], mia["_members"]
    bins = np.histogram_bin_edges(scores, bins=30)
    ax.hist(scores[members], bins=bins, alpha=0.6, label="trained on (members)")
    ax.hist(scores[~members], bins=bins, alpha=0.6, label="never seen")
    ax.set(xlabel="loss drop (initial - shared adapter)", ylabel="canaries", title="Canary membership scores")
    ax.legend(fontsize=8)
    return _save(fig, plot_dir, "mia_scores.png")


def render_plots(report: dict[str, Any], plot_dir: Path) -> list[str]:
    """Write the report's PNGs into ``plot_dir``; return their file names."""
    plot_dir.mkdir(parents=True, exist_ok=True)
    written = [_bytes_per_site(report, plot_dir), _secagg_correlation(report, plot_dir)]
    if report.get("membership_inference"):
        written.append(_mia_scores(report["membership_inference"], plot_dir))
    return written


def _what_left(report: dict[str, Any]) -> list[str]:
    ok = "yes" if report["only_adapter_left_sites"] else "**NO**"
    lines = [
        f"# fedtune privacy audit: `{report['run']}`",
        "",
        f"- Base model fingerprint: `{report['base_model_fingerprint']}`",
        f"- Shared adapter fingerprint: `{report['adapter_fingerprint']}` ({report['peft_method']})",
        f"- Sites whose own records were audited: {report['sites_recorded']}",
        "",
        "## What left the sites",
        "",
        f"Only the adapter left the sites: {ok}.",
    ]
    if report.get("head_statistics_shapes"):
        shapes = " and ".join(str(tuple(s)) for s in report["head_statistics_shapes"])
        lines += [
            "",
            f"With `head-fit`, the sites also sent the statistics of their features after every round "
            f"(two tensors, {shapes}: means of x x^T and of x y^T over their training examples), through "
            "the same aggregation as the adapter.",
        ]
    if report.get("head_moments_shapes"):
        shapes = " and ".join(str(tuple(s)) for s in report["head_moments_shapes"])
        lines += [
            "",
            f"Under SecAgg+ they first sent their features' moments (two tensors, {shapes}: the mean of "
            "each feature and of its square), and the statistics then centred and scaled in the frame "
            "the pooled moments give.",
        ]
    if report["offending_tensors"]:
        lines += ["", "| node | round | stage | tensor | shape | dtype |", "|---|---|---|---|---|---|"]
        lines += [
            f"| {o['node']} | {o['round']} | {o['stage']} | {o['name']} | {o['shape']} | {o['dtype']} |"
            for o in report["offending_tensors"]
        ]
    return lines


def _trail(report: dict[str, Any]) -> list[str]:
    tx, integrity = report["tensors_exchanged"], report["integrity"]
    lines = [
        "Site records match what the coordinator received (SHA-256 and bytes): "
        f"{report['site_and_server_records_agree']}.",
        "",
        "## Audit trail consistency",
        "",
        "Every record, each site's record against the coordinator's, `metrics.json` totals against the "
        f"wire records: {'consistent' if integrity['consistent'] else '**INCONSISTENT**'}.",
        *(f"- {m}" for m in integrity["mismatches"]),
        "",
        "| direction | messages | tensors | bytes | per site per round | vs full model |",
        "|---|---|---|---|---|---|",
    ]
    for d, label in (("up", "sites -> server"), ("down", "server -> sites")):
        t, per = tx["totals"][d], tx["bytes_per_site_per_round"][d]
        lines.append(
            f"| {label} | {t['messages']} | {t['tensors']} | {t['bytes']:,} | {per:,.0f} | "
            f"{tx[f'{d}_ratio_to_full_model']:.4f} |"
        )
    return [
        *lines,
        "",
        f"Full fine-tuning would move the whole base model ({tx['base_model_bytes']:,} bytes) "
        "per site per round.",
    ]


def _secagg(report: dict[str, Any]) -> list[str]:
    sa = report["secagg"]
    bound = (
        f" (bound {sa['aggregate_error_bound']:.3g}: within = {sa['aggregate_within_bound']})."
        if sa["aggregate_error_bound"] is not None
        else f" ({sa['aggregate_note']})."
    )
    return [
        "",
        "## Secure aggregation",
        "",
        f"SecAgg+ on: {sa['secure_aggregation']}. Updates masked "
        f"(|correlation| < {CORRELATION_MASKED} for every site and round): **{sa['masked']}** "
        f"(max |correlation| {sa['max_abs_correlation']:.4f}).",
        "Unmasked aggregate vs plain weighted average of the true updates: max abs error "
        f"{sa['aggregate_max_abs_error']:.3g}" + bound,
        "",
        "SecAgg+ masks come from Flower's `pseudo_rand_gen` (numpy `RandomState` seeded with 32 bits of "
        "the shared key): this hides updates from an honest-but-curious coordinator, it is not a "
        "cryptographic PRG. The number of training examples of each site is visible to the coordinator.",
        "",
        "| round | site | correlation |",
        "|---|---|---|",
        *(f"| {r['round']} | {r['site']} | {r['correlation']:.4f} |" for r in sa["per_site_round"]),
    ]


def _privacy(report: dict[str, Any]) -> list[str]:
    dp = report["dp"]
    lines = [
        "",
        "## Differential privacy",
        "",
        f"Mode: {dp['mode']}; accountant epsilon: {dp['accountant_epsilon']} at delta {dp['delta']:g}.",
    ]
    if dp.get("example_epsilon_by_site"):
        lines += [
            "",
            "Patient-level (DP-SGD) epsilon per site, each site's own accountant:",
            "",
            "| site | epsilon |",
            "|---|---|",
            *(f"| {site} | {eps:.3f} |" for site, eps in dp["example_epsilon_by_site"].items()),
        ]
    mia = report.get("membership_inference")
    if mia:
        e = report["empirical_epsilon"]
        lines += [
            "",
            "## Membership inference (canaries)",
            "",
            f"{mia['canaries']} canaries, {mia['members']} planted at site 0. Score: {mia['score']}.",
            f"Attack AUC {mia['attack_auc']:.4f}; TPR at 1% FPR {mia['tpr_at_1pct_fpr']:.4f}.",
            f"Empirical epsilon (Steinke, Nasr, Jagielski 2023, one run, {e['confidence']:.0%} confidence): "
            f"**{e['lower_bound']:.3f}** ({e['correct']}/{e['guesses']} guesses correct) vs accountant "
            f"epsilon {e['accountant_epsilon']}"
            + (
                f"; the canary site's patient-level epsilon {e['canary_site_example_epsilon']:.3f}."
                if e.get("canary_site_example_epsilon") is not None
                else "."
            ),
        ]
    return lines


def render_markdown(report: dict[str, Any], plots: list[str]) -> str:
    """``audit/report.md``: what left the sites, the trail's consistency, SecAgg+, DP and the plots."""
    lines = [*_what_left(report), *_trail(report), *_secagg(report), *_privacy(report)]
    lines += ["", "## Plots", ""] + [f"![{p}](plots/{p})" for p in plots]
    return "\n".join(lines) + "\n"
