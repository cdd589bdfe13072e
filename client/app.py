"""The fedtune ClientApp (a hospital site)."""

from __future__ import annotations

from flwr.app import Context
from flwr.client import Client
from flwr.clientapp import ClientApp

from .mods import secure_aggregation_mod
from .site import SiteClient


def client_fn(context: Context) -> Client:
    """Build the site client; its data comes from the node config (partition or ``data-path``)."""
    return SiteClient(dict(context.node_config)).to_client()


app = ClientApp(client_fn=client_fn, mods=[secure_aggregation_mod])
