"""Checks run once, before any Flower process starts, where the data and the model are visible.

Everything a site or the coordinator would otherwise discover inside the federation (one traceback
per site, through Flower's simulation) is checked here first: the output folder, the base model
folder and ``max-length`` against its positions, the data files (they exist and parse, have the
columns, enough rows and classes), the coordinator's test set and its labels, and every simulated
site's share of the data. Each failure is one :class:`PreflightError` naming the file, line, column
or key and the fix; the CLI prints it and exits 2.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from .base_files import resolve_base, weight_files
from .config import FedConfig
from .data import DataError
from .site_config import SiteConfig
from .sites import SiteData, coordinator_test_set, deployed_site, simulation_pool, site_data

T = TypeVar("T")


class PreflightError(ValueError):
    """A run that cannot succeed, found before it started; the message names the input and the fix."""


def check_out_dir(out_dir: str | Path) -> None:
    """``out_dir`` is a folder or does not exist yet (then its parent must not be a file)."""
    path = Path(out_dir)
    for p in (path, *path.parents):
        if p.exists() and not p.is_dir():
            raise PreflightError(f"`--out` {path}: {p} is a file, not a folder; choose a folder path.")


def check_base_model(cfg: FedConfig) -> Path:
    """The base model folder has a config and weights, and ``max-length`` fits its positions.

    Returns
    -------
    Path
        The resolved model folder.
    """
    try:
        model_dir = resolve_base(cfg)
        weight_files(model_dir)
    except FileNotFoundError as err:
        raise PreflightError(str(err)) from None
    try:
        positions = json.loads((model_dir / "config.json").read_text()).get("max_position_embeddings")
    except (OSError, ValueError) as err:
        raise PreflightError(f"`base-model`: cannot read {model_dir / 'config.json'} ({err}).") from None
    if isinstance(positions, int) and cfg.max_length > positions:
        raise PreflightError(
            f"`max-length` {cfg.max_length} exceeds the {positions} positions of the base model "
            f"({model_dir / 'config.json'}: max_position_embeddings); set `max-length` <= {positions}."
        )
    return model_dir


def check_simulation(
    cfg: FedConfig, num_clients: int, node_config_fn: Callable[[SiteConfig], SiteConfig] | None = None
) -> None:
    """Everything ``fedtune simulate`` can check before Ray starts (see the module docstring).

    Builds the coordinator's test set and every simulated site's data exactly as the run will
    (the results are cached in this process), so a site that would fail fails here, once.
    ``node_config_fn`` maps simulated site ``i``'s node config to the one it uses, as the
    ClientApp's does (a site that reads its own file: the file is checked, not the shared pool).
    """
    if not cfg.resume:
        check_out_dir(cfg.out_dir)
    check_base_model(cfg)
    _data(lambda: coordinator_test_set(cfg))
    if node_config_fn is None:
        rest = _data(lambda: simulation_pool(cfg)[0])
        if num_clients > len(rest):
            raise PreflightError(
                f"`--num-clients` {num_clients} exceeds the {len(rest)} examples left for the sites (the "
                "data minus the coordinator's held-out share), so some hospital would have none; simulate "
                f"at most {len(rest)} hospitals or use more data (`max-examples`, `data-path`)."
            )
    for i in range(num_clients):
        site = SiteConfig(partition_id=i, num_partitions=num_clients)
        site = node_config_fn(site) if node_config_fn else site
        _data(functools.partial(site_data, cfg, site), f"simulated site {i}")


def check_site_file(cfg: FedConfig, data_path: str | Path) -> SiteData:
    """A deployed site's own file, read and split as the site will (its checks at start-up)."""
    return _data(lambda: deployed_site(cfg, str(data_path)), f"site file {data_path}")


def _data(load: Callable[[], T], what: str = "") -> T:
    """Run ``load``; a failure becomes one :class:`PreflightError`.

    A :class:`~fedtune.common.data.DataError` already names its file, line and column; any other
    error is prefixed with ``what`` (the site it concerns), if given.
    """
    try:
        return load()
    except DataError as err:
        raise PreflightError(str(err)) from None
    except (ValueError, OSError, UnicodeDecodeError) as err:
        raise PreflightError(f"{what}: {err}" if what else str(err)) from None
