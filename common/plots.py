"""PNG plots of per-round metric curves (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - backend first
from matplotlib.ticker import MaxNLocator  # noqa: E402

from .records import RoundRecord  # noqa: E402


@dataclass(frozen=True)
class Panel:
    """One plot: its title, y axis (label, scale of the values, whether it starts at 0) and series."""

    title: str
    ylabel: str
    series: list[tuple[str, str]]  # (round-record field, legend label)
    scale: float = 1.0
    from_zero: bool = False


MAX_ROUND_TICKS = 15  # up to this many rounds each gets a tick; beyond, whole numbers chosen by matplotlib
# plot file -> its panel
PANELS: dict[str, Panel] = {
    "quality.png": Panel(
        "Shared adapter quality per round",
        "score",
        [
            ("accuracy", "held-out accuracy"),
            ("macro_f1", "held-out macro-F1"),
            ("auc", "held-out ROC AUC"),
            ("exact_match", "held-out exact match"),
            ("category_match", "held-out category match"),
            ("valid_code", "held-out valid codes"),
            ("sites_accuracy", "sites' local accuracy (mean)"),
            ("sites_macro_f1", "sites' local macro-F1 (mean)"),
            ("sites_category_match", "sites' local category match (mean)"),
        ],
    ),
    "loss.png": Panel(
        "Loss per round",
        "cross-entropy",
        [
            ("train_loss", "sites' train loss (mean)"),
            ("loss", "held-out loss"),
            ("sites_loss", "sites' local loss"),
        ],
    ),
    "bytes.png": Panel(
        "Bytes on the wire per round (all sites)",
        "MB",
        [("bytes_up", "sites -> server"), ("bytes_down", "server -> sites")],
        scale=1e-6,
        from_zero=True,
    ),
}


def plot_records(records: Sequence[RoundRecord], out_dir: Path) -> list[Path]:
    """Write one PNG per panel in :data:`PANELS` with the series present in ``records``.

    Rounds are whole-number ticks, values carry no axis offset, and the legend sits below the axes.

    Returns
    -------
    list[Path]
        The files written (a panel with no data is skipped).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for filename, panel in PANELS.items():
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        drawn, rounds = 0, set()
        for key, label in panel.series:
            points = [
                (r.round, getattr(r, key) * panel.scale) for r in records if getattr(r, key) is not None
            ]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, marker="o", label=label)
                drawn, rounds = drawn + 1, rounds | set(xs)
        if drawn:
            ax.set(title=panel.title, xlabel="round", ylabel=panel.ylabel)
            if len(rounds) <= MAX_ROUND_TICKS:
                ax.set_xticks(sorted(rounds))
            else:
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.ticklabel_format(axis="y", useOffset=False, style="plain")
            if panel.from_zero:
                ax.set_ylim(bottom=0, top=ax.get_ylim()[1] * 1.05)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=min(drawn, 3))
            fig.tight_layout()
            fig.savefig(out_dir / filename, dpi=110)
            written.append(out_dir / filename)
        plt.close(fig)
    return written
