"""Shared plumbing of the ``fedtune bench NAME [--quick]`` drivers.

Every benchmark runs its compared arms side by side in one invocation, prints a table and
writes ``results/NAME.json`` (rows + the machine + the exact command), ``results/NAME.md``
(the table) and its PNG plots. Federated arms run as real ``fedtune simulate`` subprocesses
(the same code path users run) while a sampler records the peak RSS of the whole process tree.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil
from fedtune.common.records import RoundRecord, read_records
from fedtune.common.run_folder import RunFolder
from rich.console import Console
from rich.table import Table

RESULTS = Path("results")
console = Console()


def machine() -> dict[str, Any]:
    """CPU, cores, memory and library versions: recorded in every results file."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions = {p: metadata.version(p) for p in ("torch", "flwr", "transformers", "peft", "ray")}
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        **versions,
    }


class PeakMemory:
    """Sample a process and all its descendants until stopped; keep the peak sums.

    ``peak_rss``: summed resident set sizes (a page shared by k processes counts k times), every
    0.2 s. ``peak_pss``: summed proportional set sizes (a shared page counts 1/k in each of its k
    processes), i.e. the memory the tree really holds, every :data:`PSS_EVERY` samples: reading a
    process's PSS walks its page tables (~60 ms for a Ray federation's tree on 2 cores), so every
    0.2 s it would take a third of a core from the run it measures.
    """

    PSS_EVERY = 10

    def __init__(self, pid: int) -> None:
        self.pid, self.peak_rss, self.peak_pss, self._stop = pid, 0, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        sample = 0
        while not self._stop.is_set():
            try:
                root = psutil.Process(self.pid)
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            self.peak_rss = max(self.peak_rss, sum(_size(p, pss=False) for p in procs))
            if sample % self.PSS_EVERY == 0:
                self.peak_pss = max(self.peak_pss, sum(_size(p, pss=True) for p in procs))
            sample += 1
            self._stop.wait(0.2)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _size(proc: psutil.Process, *, pss: bool) -> int:
    """The PSS (``pss``) or RSS of ``proc`` in bytes; 0 once it has gone."""
    try:
        return proc.memory_full_info().pss if pss else proc.memory_info().rss
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return 0


@dataclass(frozen=True)
class Arm:
    """What one federated arm produced."""

    records: list[RoundRecord]
    seconds: float
    peak_rss_bytes: int
    peak_pss_bytes: int
    out: Path

    @property
    def final(self) -> RoundRecord:
        """The last round's record."""
        return self.records[-1]

    def mean_round_seconds(self, skip_first: bool = True) -> float:
        """Mean seconds per round (the first round, which includes actor start-up, skipped if asked)."""
        rounds = self.records[2:] if skip_first and len(self.records) > 2 else self.records[1:]
        return sum(r.seconds for r in rounds) / len(rounds)


SIMULATE: tuple[str, ...] = ("fedtune.simulations.cli", "simulate", "--overwrite")


def simulate_arm(
    out: Path,
    num_clients: int,
    run_config: dict[str, Any],
    timeout: float = 3600,
    entry: Sequence[str] = SIMULATE,
) -> Arm:
    """Run a simulation in a subprocess (fresh Ray each time) and measure it.

    Parameters
    ----------
    entry
        The module and arguments run with ``python -m`` before ``--num-clients``, ``--out`` and
        ``--run-config``: ``fedtune simulate`` by default; a driver may pass its own entry point.
    """
    items = " ".join(f"{k}={v}" for k, v in run_config.items())
    cmd = [
        sys.executable,
        "-m",
        *entry,
        "--num-clients",
        str(num_clients),
        "--out",
        str(out),
        "--run-config",
        items,
    ]
    shown = " ".join(entry)
    console.print(f'[dim]$ python -m {shown} --num-clients {num_clients} --run-config "{items}"[/dim]')
    start = time.perf_counter()
    log = out.parent / f"{out.name}.log"  # not with_suffix: labels hold dots (dirichlet-0.3)
    out.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        with PeakMemory(proc.pid) as memory:
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise RuntimeError(f"arm timed out after {timeout:.0f} s; log: {log}") from None
    if rc != 0:
        raise RuntimeError(f"arm failed (exit {rc}); see {log}")
    records = read_records(RunFolder(out).metrics)
    return Arm(
        records=records,
        seconds=time.perf_counter() - start,
        peak_rss_bytes=memory.peak_rss,
        peak_pss_bytes=memory.peak_pss,
        out=out,
    )


def write_results(
    name: str,
    rows: Sequence[dict[str, Any]],
    *,
    columns: Sequence[str],
    notes: Sequence[str] = (),
    extra: dict[str, Any] | None = None,
    quick: bool,
) -> Path:
    """Print the table and write ``results/NAME.json`` and ``results/NAME.md``; return the JSON path."""
    RESULTS.mkdir(exist_ok=True)
    command = bench_command(name, quick)
    payload = {
        "benchmark": name,
        "command": command,
        "quick": quick,
        "machine": machine(),
        "rows": list(rows),
        "notes": list(notes),
        **(extra or {}),
    }
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2, default=float) + "\n")
    md = [
        f"## {name}",
        "",
        f"`{command}` on {payload['machine']['cpu']} ({payload['machine']['cores']} cores), "
        f"torch {payload['machine']['torch']}, flwr {payload['machine']['flwr']}.",
        "",
    ]
    md += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    md += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    md += [""] + [f"- {n}" for n in notes]
    (RESULTS / f"{name}.md").write_text("\n".join(md) + "\n")
    table = Table(title=command)
    for c in columns:
        table.add_column(c, justify="right")
    for r in rows:
        table.add_row(*(_cell(r.get(c)) for c in columns))
    console.print(table)
    for n in notes:
        console.print(f"- {n}")
    return RESULTS / f"{name}.json"


def bench_command(name: str, quick: bool) -> str:
    """The command line that reproduces this invocation, with its ``FEDTUNE_BENCH_*`` variables.

    Those variables pick arms, threads or reuse of saved arms, so a table made from a subset says so.
    """
    env = [f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("FEDTUNE_BENCH_")]
    return " ".join([*env, f"fedtune bench {name}"]) + (" --quick" if quick else "")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
