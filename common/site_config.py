"""A site's own settings: Flower's node config, typed and checked in one place.

In simulation Flower gives each site ``partition-id`` and ``num-partitions``; a deployed SuperNode
gets what its operator passes with ``flower-supernode --node-config "data-path='...' ..."``. Every
part of the site (data, audit record, base model, the SecAgg+ requirement, error logs) reads the
typed :class:`SiteConfig`, never the raw mapping. A key no site knows is an error naming it and
the valid keys (a typo would otherwise silently fall back to a default).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .config import ConfigError


@dataclass(frozen=True)
class SiteConfig:
    """One site's node config (field ``a_b`` is node-config key ``a-b``).

    Attributes
    ----------
    partition_id, num_partitions
        Simulation: which of the ``num_partitions`` simulated sites this is (Flower sets both).
    data_path
        Deployment: the site's own CSV/JSONL file.
    audit_dir
        Deployment: the folder of the site's own audit record (empty: no record).
    model_cache_dir
        Where base models received from the coordinator are kept (empty: the user cache folder).
    base_model
        The site's own copy of the base model (empty: the cache or the packaged model).
    require_secure_aggregation
        Refuse to train unless the coordinator runs SecAgg+.
    worker_socket
        Deployment: the Unix socket of the site's long-lived worker (``fedtune site-worker``), which
        then trains and scores with the model kept loaded (empty: each message loads it).
    """

    partition_id: int | None = None
    num_partitions: int | None = None
    data_path: str = ""
    audit_dir: str = ""
    model_cache_dir: str = ""
    base_model: str = ""
    require_secure_aggregation: bool = False
    worker_socket: str = ""

    @classmethod
    def parse(cls, node_config: Mapping[str, Any]) -> SiteConfig:
        """Type ``node_config``.

        Raises
        ------
        ConfigError
            An unknown key, or a value of the wrong type (names the key and what it takes).
        """
        unknown = sorted(set(node_config) - set(KEYS))
        if unknown:
            raise ConfigError(
                f"Node config key(s) {', '.join(f'`{k}`' for k in unknown)} unknown to a fedtune site; "
                f"valid: {', '.join(f'`{k}`' for k in KEYS)}. Fix the SuperNode's --node-config."
            )
        values = {KEYS[key]: _typed(key, value) for key, value in node_config.items()}
        return cls(**values)

    def node_config(self) -> dict[str, str]:
        """The node-config items of the settings that are set (as ``--node-config`` takes them)."""
        out = {}
        for key, name in KEYS.items():
            value = getattr(self, name)
            if value is not None and value != "" and value is not False:  # partition 0 stays
                out[key] = str(value).lower() if isinstance(value, bool) else str(value)
        return out

    def label(self, node_id: int) -> str:
        """How the site's own files name it: its partition id in simulation, else its node id."""
        return str(node_id if self.partition_id is None else self.partition_id)

    @property
    def cache_dir(self) -> Path | None:
        """``model_cache_dir`` as a path, ``None`` when not set."""
        return Path(self.model_cache_dir).expanduser() if self.model_cache_dir else None


KEYS: dict[str, str] = {f.name.replace("_", "-"): f.name for f in fields(SiteConfig)}


def site_config(node_config: Mapping[str, Any]) -> SiteConfig:
    """:meth:`SiteConfig.parse` of ``node_config``, parsed once per distinct node config.

    The ClientApp and each of its mods read the site's config for every message; the node config of
    a site does not change, so they share one parse (an invalid one raises every time).
    """
    return _parse_items(tuple(sorted(node_config.items())))


@functools.lru_cache(maxsize=64)
def _parse_items(items: tuple[tuple[str, Any], ...]) -> SiteConfig:
    return SiteConfig.parse(dict(items))


def _typed(key: str, value: Any) -> Any:
    name = KEYS[key]
    if name in ("partition_id", "num_partitions"):
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"Node config `{key}` must be a whole number, got {value!r}.") from None
    if name == "require_secure_aggregation":
        text = str(value).strip().lower()
        if text not in ("true", "false"):
            raise ConfigError(f"Node config `{key}` must be true or false, got {value!r}.")
        return text == "true"
    return str(value)
