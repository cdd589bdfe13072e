"""The benchmarks' figures: a new matplotlib figure and ``results/<name>_<suffix>.png``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .harness import RESULTS

if TYPE_CHECKING:  # heavy imports only where a benchmark trains in-process
    pass


def new_figure(width: float = 7.0, height: float = 4.0, ncols: int = 1):  # noqa: ANN201 - (figure, axes)
    """A matplotlib figure with ``ncols`` axes side by side, on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, ncols, figsize=(width, height))


def save_figure(fig: Any, name: str, suffix: str) -> Path:
    """Save ``fig`` as ``results/<name>_<suffix>.png`` and close it."""
    import matplotlib.pyplot as plt

    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}_{suffix}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
