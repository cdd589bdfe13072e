"""The fedtune ClientApp (a hospital site)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fedtune.common.site_config import SiteConfig, site_config
from flwr.app import Context
from flwr.client import Client
from flwr.clientapp import ClientApp

from .audit import make_audit_mods
from .base_model import make_base_model_mod
from .errors import make_site_errors_mod
from .mods import dp_mod, secure_aggregation_mod
from .worker import WorkerClient

NodeConfigFn = Callable[[SiteConfig], SiteConfig]


def make_client_app(
    audit_dir: str | None = None,
    base_model: str = "",
    node_config_fn: NodeConfigFn | None = None,
    site_log_dir: str | None = None,
) -> ClientApp:
    """The ClientApp; mods outermost first: site errors, wire record, base model, SecAgg+, capture, DP.

    Importing it imports no torch, transformers or peft: in deployment every message runs in a fresh
    process, and the SecAgg+ key-exchange and unmasking messages and the base-model status queries
    never touch the model. Only a message that reaches the site's client (train, evaluate) loads them,
    and with node config ``worker-socket`` not even that one: the site's worker
    (:mod:`fedtune.client.worker`) trains and scores with the model it keeps loaded.

    Parameters
    ----------
    audit_dir
        Simulation: where the sites' audit records go (deployment: the node config's ``audit-dir``);
        each site writes only to its own folder. ``None`` = no records.
    base_model
        Simulation: the coordinator's ``base-model`` folder, which the simulated sites share
        (deployment: each site's node config ``base-model``, its model cache or the packaged model).
    node_config_fn
        Maps a site's config to the one it uses (a benchmark gives simulated sites their files).
    site_log_dir
        Simulation: where simulated site ``i`` logs the details of its errors (``site-i.log``); the
        coordinator only learns their category (:mod:`fedtune.client.errors`).
    """
    wire_mod, capture_mod = make_audit_mods(audit_dir)

    def client_fn(context: Context) -> Client:
        site = site_config(context.node_config)
        if node_config_fn is not None:
            site = node_config_fn(site)
        if site.worker_socket:  # the site's long-lived worker holds the model (client/worker.py)
            return WorkerClient(Path(site.worker_socket), site.node_config(), context.node_id).to_client()
        from .site import SiteClient  # torch, transformers, peft: only for a message that needs the model

        return SiteClient(site, base_model, context.node_id).to_client()

    mods = [
        make_site_errors_mod(site_log_dir),
        wire_mod,
        make_base_model_mod(base_model),
        secure_aggregation_mod,
        capture_mod,
        dp_mod,
    ]
    return ClientApp(client_fn=client_fn, mods=mods)


app = make_client_app()
