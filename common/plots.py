"""PNG plots of per-round metric curves (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - backend first

# plot file -> (title, y label, [(record key, legend label), ...])
PANELS: dict[str, tuple[str, str, list[tuple[str, str]]]] = {
    "quality.png": (
        "Shared adapter quality per round",
        "score",
        [
            ("accuracy", "held-out accuracy"),
            ("macro_f1", "held-out macro-F1"),
            ("auc", "held-out ROC AUC"),
            ("sites_accuracy", "sites' local accuracy (mean)"),
            ("sites_macro_f1", "sites' local macro-F1 (mean)"),
        ],
    ),
    "loss.png": (
        "Loss per round",
        "cross-entropy",
        [
            ("train_loss", "sites' train loss (mean)"),
            ("loss", "held-out loss"),
            ("sites_loss", "sites' local loss"),
        ],
    ),
    "bytes.png": (
        "Bytes on the wire per round (all sites)",
        "bytes",
        [("bytes_up", "sites -> server"), ("bytes_down", "server -> sites")],
    ),
}


def plot_records(records: Sequence[dict[str, Any]], out_dir: Path) -> list[Path]:
    """Write one PNG per panel in :data:`PANELS` with the series present in ``records``.

    Returns
    -------
    list[Path]
        The files written (a panel with no data is skipped).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for filename, (title, ylabel, series) in PANELS.items():
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        drawn = 0
        for key, label in series:
            points = [(r["round"], r[key]) for r in records if r.get(key) is not None]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, marker="o", label=label)
                drawn += 1
        if drawn:
            ax.set(title=title, xlabel="round", ylabel=ylabel)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            fig.tight_layout()
            fig.savefig(out_dir / filename, dpi=110)
            written.append(out_dir / filename)
        plt.close(fig)
    return written
