"""``fedtune bench report``: ``BENCHMARKS.md`` assembled from ``results/``."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from . import DESCRIPTIONS, NAMES
from .harness import RESULTS

if TYPE_CHECKING:  # heavy imports only where a benchmark trains in-process
    pass


def collect(results_dir: str | Path = RESULTS, out: str | Path = "BENCHMARKS.md") -> Path:
    """Assemble ``BENCHMARKS.md`` from ``results_dir/<name>.md``, its PNGs and the exact command.

    Benchmarks are listed in registry order; one without results says how to produce them. Plot
    paths are written relative to ``out``'s folder so the images render on GitHub.

    Returns
    -------
    Path
        ``out``.
    """
    results_dir, out = Path(results_dir), Path(out)
    base = out.resolve().parent
    lines = [
        "# Benchmarks",
        "",
        "Written by `fedtune bench report` from `results/` (each benchmark: `fedtune bench NAME`; "
        "`--quick` runs are small validation runs, not the figures the issue asks for). Every table "
        "records the machine it ran on; ratios are taken against the baseline measured in the same run.",
        "",
    ]
    lines += [f"- [{n}](#{n}): {DESCRIPTIONS[n]}" for n in NAMES]
    for name in NAMES:
        md, js = results_dir / f"{name}.md", results_dir / f"{name}.json"
        lines.append("")
        if not md.is_file():
            lines += [f"## {name}", "", f"Not run yet: `fedtune bench {name}`.", ""]
            continue
        meta = json.loads(js.read_text()) if js.is_file() else {}
        command = meta.get("command", f"fedtune bench {name}")
        body = md.read_text().rstrip("\n").splitlines()
        if body and body[0].startswith("## "):
            body = body[1:]
        lines += [f"## {name}", "", DESCRIPTIONS[name], ""]
        if meta.get("quick"):
            lines += [
                "> Quick validation run: tiny data and few arms; rerun without `--quick` for the "
                "figures the issue asks for.",
                "",
            ]
        lines += ["```bash", command, "```", *body, ""]
        for png in sorted(results_dir.glob(f"{name}_*.png")):
            rel = os.path.relpath(png.resolve(), base)
            lines += [f"![{name}: {png.stem.removeprefix(name + '_')}]({rel})", ""]
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines))  # one blank line between blocks
    out.write_text(text.rstrip("\n") + "\n")
    return out
