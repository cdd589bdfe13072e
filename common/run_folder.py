"""A new run in an output folder is all or nothing: no folder ever mixes two runs.

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
from pathlib import Path

from .checkpoint import find_checkpoint

METRICS = "metrics.json"  # its presence marks a folder that holds a run
# what a run writes under OUT (its checkpoint aside): removed when it fails before a checkpoint
RUN_OUTPUTS = (
    METRICS,
    "run_config.json",
    "adapter",
    "plots",
    "audit",
    "privacy.json",
    "base_model_distribution.json",
    "site-logs",
)


def holds_run(out_dir: str | Path) -> bool:
    """Whether ``out_dir`` holds a run (finished or resumable)."""
    return (Path(out_dir) / METRICS).is_file()


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
        if find_checkpoint(out) is None:
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
    """On a failure before the first checkpoint, remove the run's outputs (:data:`RUN_OUTPUTS`) only."""
    try:
        yield
    except BaseException:
        out = Path(out_dir)
        if find_checkpoint(out) is None:
            for name in RUN_OUTPUTS:
                path = out / name
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
        raise
