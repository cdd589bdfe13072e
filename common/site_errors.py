"""Site error categories: what the coordinator may learn of a site's failure (no flwr needed).

A site's exception message may name its data file, a line, a row's content or a label value. The
site (``fedtune.client.errors``) logs it locally and sends only a :class:`SiteError`, whose text is the
category's description (:data:`CATEGORIES`); the coordinator reads it back with :func:`parse_reason`.
"""

from __future__ import annotations

import re

from .base_files import FingerprintMismatchError
from .config import ConfigError
from .data import DataError
from .preflight import PreflightError


class PrivacyBudgetExhaustedError(RuntimeError):
    """A site's next round of DP-SGD would take its epsilon past ``dp-example-target-epsilon``."""


class SiteWorkerError(RuntimeError):
    """A site's worker (node config ``worker-socket``) is not running, stopped, or runs other code."""


class UpdateRefusedError(ValueError):
    """A site refuses to send its update: not finite, or outside what SecAgg+ can carry unchanged."""


class SecAggRequiredError(PermissionError):
    """A site that requires secure aggregation was asked for an unmasked update."""


# category -> (exception types, what the coordinator is told); the first match wins, "internal" last
CATEGORIES: dict[str, tuple[tuple[type[BaseException], ...], str]] = {
    "update": (
        (UpdateRefusedError,),
        "it refused to send an update that is not finite or does not fit SecAgg+ (see "
        "`secagg-max-weight`, `secagg-clipping-range`, `learning-rate`)",
    ),
    "policy": (
        (SecAggRequiredError,),
        "it requires secure aggregation and refused to send its update unmasked "
        "(set `secure-aggregation=true`)",
    ),
    "worker": (
        (SiteWorkerError,),
        "its site worker (node config `worker-socket`) is not running or runs other code; the site's log "
        "says how to restart it",
    ),
    "data": ((DataError, PreflightError, UnicodeDecodeError), "its data failed validation"),
    "base-model": (
        (FingerprintMismatchError, FileNotFoundError),
        "its base model is missing or differs from the coordinator's",
    ),
    "config": ((ConfigError,), "it refused the run config"),
    "privacy-budget": (
        (PrivacyBudgetExhaustedError,),
        "its next round would pass its patient-level privacy budget (`dp-example-target-epsilon`), so it "
        "stopped training",
    ),
    "memory": ((MemoryError,), "it ran out of memory"),
    "internal": ((Exception,), "an unexpected error"),
}
_REASON = re.compile(r"site error \[([a-z-]+)\]: ([^'<>]*?)(?:; the details|$)")


class SiteError(RuntimeError):
    """What the coordinator learns of a site's failure: its category, nothing of its data."""

    def __init__(self, category: str) -> None:
        self.category = category
        super().__init__(
            f"site error [{category}]: {CATEGORIES[category][1]}; the details stay in the site's own log."
        )


def category_of(err: BaseException) -> str:
    """The :data:`CATEGORIES` entry ``err`` belongs to (CUDA out-of-memory counts as ``memory``)."""
    if type(err).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError, without importing torch here
        return "memory"
    return next(name for name, (types, _) in CATEGORIES.items() if isinstance(err, types))


def parse_reason(reason: str) -> str | None:
    """``"site error [category]: description"`` of a :class:`SiteError` in an error reply's reason.

    ``None`` when the reason holds none (a reply from a site without this module, or Flower's own).
    """
    match = _REASON.search(reason)
    return f"site error [{match.group(1)}]: {match.group(2).strip()}" if match else None
