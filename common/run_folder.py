"""A run's output folder: one :class:`RunFolder` names every path; a new run is all or nothing.

:class:`RunFolder` is the one definition of the folder's layout: the coordinator, the audit, the
benchmarks and the deployment harness all reach ``metrics.json``, ``adapter/``, ``checkpoint/``,
``audit/`` and the rest through it (a site's own audit folder through :func:`site_audit_dir`).
Writes go through :mod:`fedtune.common.files` (atomic).

:func:`fresh_run` wraps a new (not resumed) run:

- a finished run already in the folder (allowed with ``--overwrite``) is moved aside to
  ``OUT.previous`` and comes back if the new run fails before its first checkpoint; it is deleted
  only when the new run has finished;
- a run that fails before writing its first checkpoint leaves nothing behind: the folder it created
  is removed, or, in a folder that held other files, the entries the run added;
- a run that fails after a checkpoint stays (it can be resumed), and so does ``OUT.previous``.

:func:`outputs_discarded_on_failure` is the deployment's variant: its logs, certificates and app
copy stay for diagnosis, and only the files that make a folder look like a run go.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .files import previous_dir

# an adapter folder (``OUT/adapter``, ``OUT/checkpoint``): PEFT's two files and fedtune's record
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_METADATA = "fedtune.json"
# the checkpoint's own files beside the adapter
CHECKPOINT_STATE = "state.json"
CHECKPOINT_ARRAYS = "server_state.safetensors"
# an audit folder (the coordinator's ``audit/server``, a site's ``audit/sites/site-ID``)
WIRE_LOG = "wire.jsonl"
GLOBAL_FINAL = "global-final.npz"
AUDIT_SITES = "sites"  # under an audit folder: one folder per site


def global_round_name(server_round: int) -> str:
    """The audit file of the shared adapter a round started from: ``global-round-NNN.npz``."""
    return f"global-round-{server_round:03d}.npz"


SENT_ROUND = "sent-round-"  # + NNN.npz: a site's audit file of the update it sent in a round


def sent_round_name(server_round: int) -> str:
    """A site's audit file of the update it sent in a round: ``sent-round-NNN.npz``."""
    return f"{SENT_ROUND}{server_round:03d}.npz"


def received_round_name(server_round: int, node: int, label: str = "") -> str:
    """The coordinator's audit file of what site ``node`` sent: ``received-round-NNN-node-N.npz``.

    ``label`` names an exchange other than the round's training (``received-LABEL-round-...``).
    """
    return f"received-{label + '-' if label else ''}round-{server_round:03d}-node-{node}.npz"


HEAD_STATS_LABEL = "head-stats"  # head-fit's exchange of feature statistics (fedtune.server.head_fit)
HEAD_MOMENTS_LABEL = "head-moments"  # under SecAgg+, the exchange of feature moments before it


def head_stats_round_name(server_round: int, label: str = HEAD_STATS_LABEL) -> str:
    """Head statistics of a round (a site's own, or the coordinator's mean): ``head-stats-round-NNN.npz``.

    ``label``: :data:`HEAD_MOMENTS_LABEL` names the feature moments of the exchange before them.
    """
    return f"{label}-round-{server_round:03d}.npz"


def aggregate_round_name(server_round: int) -> str:
    """The coordinator's averaged adapter of a round before head-fit replaced its head."""
    return f"aggregate-round-{server_round:03d}.npz"


def site_audit_dir(audit_dir: str | Path, site: str) -> Path:
    """A site's own audit folder (in simulation under the run's ``audit/sites``)."""
    return Path(audit_dir) / AUDIT_SITES / f"site-{site}"


@dataclass(frozen=True)
class RunFolder:
    """The paths of one run's output folder ``root`` (``--out`` / ``out-dir``)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def metrics(self) -> Path:
        """``metrics.json``: one record per round (its presence marks a folder holding a run)."""
        return self.root / "metrics.json"

    @property
    def run_config(self) -> Path:
        """``run_config.json``: the run's resolved config (a resumed run must match it)."""
        return self.root / "run_config.json"

    @property
    def adapter(self) -> Path:
        """``adapter/``: the shared adapter in PEFT's format plus ``fedtune.json``."""
        return self.root / "adapter"

    @property
    def adapter_weights(self) -> Path:
        """The shared adapter's weights file."""
        return self.adapter / ADAPTER_WEIGHTS

    @property
    def adapter_metadata(self) -> Path:
        """The shared adapter's ``fedtune.json``."""
        return self.adapter / ADAPTER_METADATA

    @property
    def checkpoint(self) -> Path:
        """``checkpoint/``: what a killed run needs to continue."""
        return self.root / "checkpoint"

    @property
    def plots(self) -> Path:
        """``plots/``: the run's own curves."""
        return self.root / "plots"

    @property
    def privacy(self) -> Path:
        """``privacy.json``: the client-level DP accountant's inputs and epsilon."""
        return self.root / "privacy.json"

    @property
    def distribution(self) -> Path:
        """``base_model_distribution.json``: one record per site node and base-model check."""
        return self.root / "base_model_distribution.json"

    @property
    def simulation(self) -> Path:
        """``simulation.json``: what the run config does not hold, the number of simulated hospitals."""
        return self.root / "simulation.json"

    @property
    def site_logs(self) -> Path:
        """``site-logs/``: simulated sites' full error logs (in deployment they stay at each site)."""
        return self.root / "site-logs"

    @property
    def audit(self) -> Path:
        """``audit/``: what crossed the wire, and the audit report."""
        return self.root / "audit"

    @property
    def audit_server(self) -> Path:
        """``audit/server/``: the coordinator's wire log and the shared adapter of every round."""
        return self.audit / "server"

    @property
    def audit_sites(self) -> Path:
        """``audit/sites/``: the sites' own audit folders (simulation; gathered there in deployment)."""
        return self.audit / AUDIT_SITES

    @property
    def audit_report(self) -> Path:
        """``audit/report.json``."""
        return self.audit / "report.json"

    @property
    def audit_report_md(self) -> Path:
        """``audit/report.md``."""
        return self.audit / "report.md"

    @property
    def audit_plots(self) -> Path:
        """``audit/plots/``: the audit report's figures."""
        return self.audit / "plots"

    def global_round(self, server_round: int) -> Path:
        """The shared adapter that round ``server_round`` started from (audit)."""
        return self.audit_server / global_round_name(server_round)

    @property
    def global_final(self) -> Path:
        """The final shared adapter's arrays (audit)."""
        return self.audit_server / GLOBAL_FINAL

    @property
    def outputs(self) -> tuple[Path, ...]:
        """What a run writes here besides its checkpoint: removed when it fails before one."""
        return (
            self.metrics,
            self.run_config,
            self.adapter,
            self.plots,
            self.audit,
            self.privacy,
            self.distribution,
            self.site_logs,
            self.simulation,
        )

    def find_checkpoint(self) -> Path | None:
        """The complete checkpoint folder: ``checkpoint/``, else ``checkpoint.old/``, else ``None``."""
        for candidate in (self.checkpoint, previous_dir(self.checkpoint)):
            if (candidate / CHECKPOINT_STATE).is_file() and (candidate / CHECKPOINT_ARRAYS).is_file():
                return candidate
        return None


def holds_run(out_dir: str | Path) -> bool:
    """Whether ``out_dir`` holds a run (finished or resumable)."""
    return RunFolder(Path(out_dir)).metrics.is_file()


def previous_run_dir(out_dir: str | Path) -> Path:
    """Where an overwritten run waits until its replacement has finished: ``OUT.previous``."""
    out = Path(out_dir)
    return out.with_name(out.name + ".previous")


@contextlib.contextmanager
def fresh_run(out_dir: str | Path, echo: Callable[[str], None] = print) -> Iterator[Path]:
    """Run a new run's block in ``out_dir`` (created); undo it on failure (see the module docstring)."""
    out = Path(out_dir)
    aside = previous_run_dir(out) if holds_run(out) else None
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
        out.rename(aside)
        echo(f"The earlier run in {out} waits in {aside} until this one finishes.")
    before = set(out.iterdir()) if out.is_dir() else None
    out.mkdir(parents=True, exist_ok=True)
    try:
        yield out
    except BaseException:
        if RunFolder(out).find_checkpoint() is None:
            _undo(out, before)
            if aside is not None:
                aside.rename(out)
                echo(f"The run failed before its first checkpoint; the earlier run is back in {out}.")
        elif aside is not None:
            echo(f"The earlier run stays in {aside}; this one can be resumed from {out}.")
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def _undo(out: Path, before: set[Path] | None) -> None:
    """Remove what the failed run added: the whole folder if it made it, else the entries it added."""
    if before is None:
        shutil.rmtree(out, ignore_errors=True)
        return
    for entry in set(out.iterdir()) - before:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


@contextlib.contextmanager
def outputs_discarded_on_failure(out_dir: str | Path) -> Iterator[None]:
    """On a failure before the first checkpoint, remove the run's outputs (:attr:`RunFolder.outputs`) only."""
    try:
        yield
    except BaseException:
        folder = RunFolder(Path(out_dir))
        if folder.find_checkpoint() is None:
            for path in folder.outputs:
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
        raise
