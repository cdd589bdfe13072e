"""The site's side of base-model distribution: a mod answering the coordinator's base-model messages.

The coordinator (``fedtune.server.distribution``) sends ``query`` messages carrying a
``fedtune.base-model`` config record whose ``op`` is one of

``status``
    Reply ``have`` (the site has the pinned base model) and ``received`` (chunks of an earlier,
    broken-off transfer already on disk, comma-separated). Nothing else: no path leaves the site.
``chunk``
    Store one chunk of tensor bytes in the site's model cache (:class:`IncomingModel`).
``commit``
    Assemble, verify the fingerprint and install the model in the cache; reply ``have``.

A site whose own folder (node config ``base-model``) holds other weights refuses with both
fingerprints named. Every other message passes through.
"""

from __future__ import annotations

import json
from pathlib import Path

from fedtune.common.files import default_cache_dir
from fedtune.common.model_store import (
    CHUNK_RECORD,
    FILES_RECORD,
    RECORD,
    IncomingModel,
    find_base_model,
)
from fedtune.common.site_config import SiteConfig, site_config
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.clientapp.typing import ClientAppCallable, Mod


def cache_dir(site: SiteConfig) -> Path:
    """The site's model cache: node config ``model-cache-dir``, else :func:`default_cache_dir`."""
    return site.cache_dir or default_cache_dir()


def site_model_dir(site: SiteConfig, expected: str, default_base_model: str = "") -> Path:
    """The site's base model with fingerprint ``expected``.

    ``default_base_model`` stands in for a missing node-config ``base-model`` (simulated sites share
    the coordinator's machine and folder).

    Raises
    ------
    FileNotFoundError
        When the site lacks it (says how it gets it).
    FingerprintMismatchError
        When the site's own copy holds other weights.
    """
    found = find_base_model(expected, site.base_model or default_base_model, cache_dir(site))
    if found is None:
        raise FileNotFoundError(
            f"This site has no base model with fingerprint {expected} (no node config `base-model`, none "
            f"in the model cache {cache_dir(site)}, the packaged model differs). The coordinator "
            "sends it before the site's first round when `distribute-base-model` is true; else install "
            "it and give its folder as node config `base-model`."
        )
    return found


def make_base_model_mod(default_base_model: str = "") -> Mod:
    """The mod answering base-model messages (``default_base_model`` as in :func:`site_model_dir`)."""

    def base_model_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        if msg.metadata.message_type != MessageType.QUERY or RECORD not in msg.content.config_records:
            return call_next(msg, ctxt)
        req = msg.content.config_records[RECORD]
        expected = str(req["fingerprint"])
        site = site_config(ctxt.node_config)
        incoming = IncomingModel(cache_dir(site), expected, ctxt.node_id)
        op = str(req["op"])
        if op == "status":
            have = (
                find_base_model(expected, site.base_model or default_base_model, cache_dir(site)) is not None
            )
            received = [] if have else incoming.received(int(req["chunk-bytes"]))
            reply = {"have": have, "received": ",".join(map(str, received))}
        elif op == "chunk":
            arrays = {k: a.numpy() for k, a in msg.content.array_records[CHUNK_RECORD].items()}
            incoming.write_chunk(int(req["index"]), int(req["chunks"]), int(req["chunk-bytes"]), arrays)
            reply = {"have": False, "received": str(int(req["index"]))}
        elif op == "commit":
            files = {k: bytes(v) for k, v in msg.content.config_records[FILES_RECORD].items()}
            hashes = json.loads(str(req["files"]))
            incoming.commit(str(req["table"]), files, hashes)
            reply = {"have": True, "received": ""}
        else:
            raise ValueError(f"Unknown base-model operation {op!r} from the coordinator.")
        return Message(RecordDict({RECORD: ConfigRecord(reply)}), reply_to=msg)

    return base_model_mod
