"""Client mods: route SecAgg+ messages to Flower's ``secaggplus_mod``, refuse unmasked uploads if required."""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

REQUIRE_SECAGG = "require-secure-aggregation"


def secure_aggregation_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Run train messages of a SecAgg+ round through ``secaggplus_mod``; pass others through.

    A site whose node config sets ``require-secure-aggregation=true`` refuses a train message
    that is not part of a SecAgg+ round, so its update is never sent unmasked.

    Raises
    ------
    PermissionError
        On an unmasked train request to a site that requires SecAgg+.
    """
    if msg.metadata.message_type == MessageType.TRAIN:
        if RECORD_KEY_CONFIGS in msg.content.config_records:
            return secaggplus_mod(msg, ctxt, call_next)
        if str(ctxt.node_config.get(REQUIRE_SECAGG, "false")).lower() == "true":
            raise PermissionError(
                f"Node {ctxt.node_id} requires secure aggregation (`{REQUIRE_SECAGG}`) but the server "
                "asked for "
                "an unmasked update; set `secure-aggregation=true` on the server."
            )
    return call_next(msg, ctxt)
