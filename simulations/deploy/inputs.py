"""What ``fedtune deploy-local`` checks and tells the coordinator before any process starts.

Every site's file and the held-out file are read with the sites' own rules; the coordinator learns
only the total row count and the sorted union of the labels (its SecAgg+ weight bound and label
names), never a site's rows or path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedtune.common.config import ConfigError, FedConfig, key_of, parse_run_config
from fedtune.common.options import USER_FILE_TASKS
from fedtune.common.preflight import PreflightError, check_base_model, check_site_file
from fedtune.common.sites import coordinator_test_set, load_configured
from fedtune.common.tables import DataError, check_label_values, file_labels

from .flower import DeployInputError


@dataclass(frozen=True)
class SiteSummary:
    """What the operator tells the coordinator about the sites' files: counts and label names, no rows."""

    rows: int
    labels: tuple[str, ...]


def summarise_sites(paths: Sequence[Path], label_column: str) -> SiteSummary:
    """Total data rows of the site files (CSV or JSONL) and the sorted union of their labels.

    Read by the sites' own rules (:func:`~fedtune.common.tables.file_labels`).

    Raises
    ------
    DeployError
        A file is missing or unparsable or has no ``label_column`` (the message names the file and
        line), or the labels look like free text (:func:`~fedtune.common.tables.check_label_values`).
    """
    rows = 0
    labels: set[str] = set()
    try:
        for path in paths:
            if not path.is_file():
                raise DeployInputError(f"Site file {path} not found; check `--site-data`.")
            n, names = file_labels(path, label_column)
            rows += n
            labels.update(names)
        check_label_values("the --site-data files", label_column, sorted(labels))
    except DataError as err:
        raise DeployInputError(str(err)) from None
    return SiteSummary(rows=rows, labels=tuple(sorted(labels)))


def _count_rows(cfg: FedConfig, paths: Sequence[Path]) -> SiteSummary:
    """Total examples of generative site files (instructions with responses; no labels to name)."""
    for path in paths:
        if not path.is_file():
            raise DeployInputError(f"Site file {path} not found; check `--site-data`.")
    try:
        return SiteSummary(rows=sum(len(load_configured(cfg, str(p))) for p in paths), labels=())
    except DataError as err:
        raise DeployInputError(str(err)) from None


def deployment_run_config(
    overrides: Mapping[str, Any],
    site_files: Sequence[Path],
    out_dir: Path,
    test_data: Path | None = None,
) -> dict[str, Any]:
    """The run config ``flwr run`` sends: ``overrides``, ``task=csv``, ``out-dir``, the coordinator's facts.

    ``task`` may also be ``instructions`` (generative, on a causal LM ``base-model``).
    ``secagg-max-weight`` defaults to the sites' total rows (a bound on any site's weight),
    ``labels`` (``csv``) to the sorted union of their labels, ``test-data-path`` to ``test_data``; a relative
    ``base-model`` is made absolute (the ServerApp runs in another folder).

    Raises
    ------
    DeployError
        ``data-path`` given (a site's file is its own), another task, no held-out test file, or a
        config error (unknown key, bad value).
    """
    if key_of("data_path") in overrides:
        raise DeployInputError(
            "`data-path` is a site's own file and never goes to the coordinator: give the sites' files "
            "with --site-data."
        )
    config: dict[str, Any] = {"task": "csv", **overrides, key_of("out_dir"): str(out_dir)}
    if test_data is not None:
        if not test_data.is_file():
            raise DeployInputError(f"--test-data {test_data} not found.")
        config[key_of("test_data_path")] = str(test_data.resolve())
    base_model = str(config.get(key_of("base_model"), "")).strip()
    if base_model:  # the ServerApp runs in another folder: a path relative to here must stay valid
        config[key_of("base_model")] = str(Path(base_model).expanduser().resolve())
    if not str(config.get(key_of("test_data_path"), "")).strip():
        raise DeployInputError(
            "The coordinator needs a held-out file to score the shared adapter: give --test-data FILE."
        )
    if str(config["task"]).strip() not in USER_FILE_TASKS:
        raise DeployInputError(
            f"deploy-local trains on the sites' files: `task` must be {' or '.join(USER_FILE_TASKS)}, got "
            f"{config['task']!r}."
        )
    try:
        cfg = parse_run_config(config)
    except ConfigError as err:
        raise DeployInputError(f"--run-config: {err}") from None
    summary = (
        summarise_sites(site_files, cfg.label_column) if cfg.task == "csv" else _count_rows(cfg, site_files)
    )
    if cfg.secagg_max_weight <= 0:
        config[key_of("secagg_max_weight")] = float(summary.rows)
    if not cfg.label_names and summary.labels:
        config[key_of("labels")] = ",".join(summary.labels)
    cfg = parse_run_config(config)
    preflight(cfg, site_files)
    typed = cfg.to_run_config()
    return {key: typed[key] for key in config}


def preflight(cfg: FedConfig, site_files: Sequence[Path]) -> None:
    """Every site's file, the held-out file and the base model checked as the run will read them.

    Raises
    ------
    DeployError
        The first problem found (names the file, line and column, or the key), before any process starts.
    """
    try:
        check_base_model(cfg)
        for path in site_files:
            check_site_file(cfg, path)
        coordinator_test_set(cfg)
    except (PreflightError, DataError) as err:
        raise DeployInputError(str(err)) from None
