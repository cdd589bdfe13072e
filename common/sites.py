"""Which private data a site trains and tests on, and the coordinator's held-out test set.

Simulation: the task's pooled data is split once (seeded) into a held-out test set for
the coordinator and the rest; the rest is partitioned over the simulated hospitals;
each hospital keeps a local test split of its partition. With ``audit-canaries`` the member
canaries join hospital 0's training data.
Deployment: a site reads only its own file (node config ``data-path``).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass

from .canaries import CANARY_SITE, run_canaries, with_members
from .config import FedConfig
from .data import TextDataset, load_task, split
from .options import USER_FILE_TASKS
from .partition import Partitioner, make_partitioner
from .prompts import apply_template, template_of
from .site_config import SiteConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SiteData:
    """A site's private training data and its local test split."""

    train: TextDataset
    test: TextDataset


def load_configured(cfg: FedConfig, data_path: str | None = None) -> TextDataset:
    """Load ``cfg.task`` from ``data_path`` (default ``cfg.data-path``) with the configured columns/labels.

    A generative task's texts come in its prompt template (``prompt-template``, else the task's own).
    """
    ds = load_task(
        cfg.task,
        data_path=cfg.data_path if data_path is None else data_path,
        text_column=cfg.text_column,
        label_column=cfg.label_column,
        response_column=cfg.response_column,
        labels=cfg.label_names,
        max_examples=cfg.max_examples,
        seed=cfg.seed,
    )
    return apply_template(ds, template_of(cfg.task, cfg.prompt_template)) if ds.generative else ds


@functools.cache
def simulation_pool(cfg: FedConfig) -> tuple[TextDataset, TextDataset]:
    """``(rest, holdout)``: the pooled task data minus the coordinator's held-out test set."""
    return split(load_configured(cfg), cfg.holdout_fraction, cfg.seed)


@functools.cache
def _partitioner(cfg: FedConfig, num_partitions: int) -> Partitioner:
    rest, _ = simulation_pool(cfg)
    return make_partitioner(
        cfg.partitioning,
        rest.labels,
        num_partitions,
        alpha=cfg.dirichlet_alpha,
        labels_per_site=cfg.specialty_labels,
        share=cfg.specialty_share,
        seed=cfg.seed,
    )


def simulated_site(cfg: FedConfig, partition_id: int, num_partitions: int) -> SiteData:
    """Private data of simulated hospital ``partition_id`` of ``num_partitions``."""
    rest, _ = simulation_pool(cfg)
    indices = _partitioner(cfg, num_partitions).load_partition(partition_id)
    train, test = split(rest.subset(indices), cfg.test_fraction, cfg.seed + partition_id)
    if cfg.audit_canaries and partition_id == CANARY_SITE:
        train = with_members(train, run_canaries(cfg, rest.label_names))
    if len(train) == 0:
        raise ValueError(
            f"Simulated site {partition_id} has no training examples ({len(indices)} in its partition); "
            "use fewer sites, a larger `max-examples` or a smaller `test-fraction`."
        )
    return SiteData(train=train, test=test)


def deployed_site(cfg: FedConfig, data_path: str) -> SiteData:
    """Private data of a deployed site: its own file, split into train and a local test set."""
    train, test = split(load_configured(cfg, data_path), cfg.test_fraction, cfg.seed)
    return SiteData(train=train, test=test)


def site_data(cfg: FedConfig, site: SiteConfig) -> SiteData:
    """Resolve a site's data from its node config.

    Raises
    ------
    ValueError
        When the node config has neither ``partition-id`` (simulation) nor ``data-path`` (deployment).
    """
    if site.data_path:
        return deployed_site(cfg, site.data_path)
    if site.partition_id is not None and site.num_partitions is not None:
        return simulated_site(cfg, site.partition_id, site.num_partitions)
    raise ValueError(
        f"Node config {sorted(site.node_config())} names no data: give the SuperNode "
        "`--node-config \"data-path='/path/site.csv'\"`."
    )


def _deployed_coordinator(cfg: FedConfig) -> bool:
    """A deployed coordinator has no site data: ``task=csv`` without ``data-path``."""
    return cfg.task in USER_FILE_TASKS and not cfg.data_path


def coordinator_test_set(cfg: FedConfig) -> TextDataset:
    """The coordinator's held-out test set: ``test-data-path`` when given, else the simulation holdout.

    With ``test-data-path`` and ``labels`` set the coordinator reads no site data (``data-path``).

    Raises
    ------
    ValueError
        A deployed coordinator (no ``data-path``) without ``labels``.
    """
    if cfg.test_data_path and cfg.task == "instructions":
        return load_configured(dataclasses.replace(cfg, max_examples=0), cfg.test_data_path)
    if cfg.test_data_path:
        labels = cfg.label_names
        if not labels:
            if _deployed_coordinator(cfg):
                raise ValueError(
                    "The coordinator has `test-data-path` but no `data-path` (a deployment) and no `labels`: "
                    "set `labels` to every class of the sites' label column, comma-separated "
                    "(e.g. `labels=0,1`)."
                )
            labels = simulation_pool(cfg)[0].label_names
        return load_task(
            "csv",
            data_path=cfg.test_data_path,
            text_column=cfg.text_column,
            label_column=cfg.label_column,
            labels=labels,
            seed=cfg.seed,
        )
    _, holdout = simulation_pool(cfg)
    if len(holdout) == 0:
        rest, _ = simulation_pool(cfg)
        raise ValueError(
            f"The coordinator's held-out test set is empty: `holdout-fraction` {cfg.holdout_fraction} of the "
            f"{len(rest)} examples keeps none (every class keeps one example for the sites); raise "
            "`holdout-fraction`, use more data or set `test-data-path`."
        )
    return holdout


def coordinator_max_weight(cfg: FedConfig) -> float:
    """SecAgg+ ``max_weight``: ``secagg-max-weight``, or 0 = the run's pooled training examples.

    Raises
    ------
    ValueError
        A deployed coordinator (no ``data-path``) under SecAgg+ without ``secagg-max-weight``.
    """
    if cfg.secagg_max_weight > 0:
        return cfg.secagg_max_weight
    if _deployed_coordinator(cfg):
        if cfg.secure_aggregation:
            raise ValueError(
                "The coordinator has no `data-path` (a deployment) and `secagg-max-weight` is 0: set "
                "`secagg-max-weight` to at least the largest site's training examples "
                "(e.g. the total rows of all sites)."
            )
        return 0.0  # unused without SecAgg+
    return float(len(simulation_pool(cfg)[0]))
