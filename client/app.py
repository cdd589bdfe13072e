"""The fedtune ClientApp (a hospital site)."""

from __future__ import annotations

from flwr.app import Context
from flwr.client import Client
from flwr.clientapp import ClientApp

from .audit import make_audit_mods
from .mods import dp_mod, secure_aggregation_mod
from .site import SiteClient


def client_fn(context: Context) -> Client:
    """Build the site client; its data comes from the node config (partition or ``data-path``)."""
    return SiteClient(dict(context.node_config)).to_client()


def make_client_app(audit_dir: str | None = None) -> ClientApp:
    """The ClientApp with its mods, outermost first: wire record, SecAgg+, update capture, DP.

    ``audit_dir`` (simulation) or the node config's ``audit-dir`` (deployment) turns the audit
    records on; each site writes only to its own folder.
    """
    wire_mod, capture_mod = make_audit_mods(audit_dir)
    return ClientApp(client_fn=client_fn, mods=[wire_mod, secure_aggregation_mod, capture_mod, dp_mod])


app = make_client_app()
