"""Site-side audit mods: a wire record of every message and the site's true (pre-mask) update.

They write under the site's own audit folder: ``make_client_app(audit_dir)`` in simulation
(``OUT/audit/sites/site-<partition>``), the node config's ``audit-dir`` in deployment. Nothing
they write is ever sent to the server.
"""

from __future__ import annotations

from pathlib import Path

from fedtune.common import instructions
from fedtune.common.audit import WireLog, message_record, payload_bytes, save_arrays, secagg_stage
from fedtune.common.run_folder import (
    HEAD_MOMENTS_LABEL,
    HEAD_STATS_LABEL,
    WIRE_LOG,
    global_round_name,
    head_stats_round_name,
    sent_round_name,
    site_audit_dir,
)
from fedtune.common.site_config import site_config
from flwr.app import Context, Message
from flwr.app.message_type import MessageType
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common import parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat


def make_audit_mods(audit_dir: str | None) -> tuple[Mod, Mod]:
    """``(wire_mod, capture_mod)`` writing to ``audit_dir`` (or the node config's ``audit-dir``)."""

    def folder(ctxt: Context) -> Path | None:
        site = site_config(ctxt.node_config)
        root = audit_dir or site.audit_dir
        if not root:
            return None
        return site_audit_dir(Path(root), site.label(ctxt.node_id))

    def wire_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        out_dir = folder(ctxt)
        if out_dir is None:
            return call_next(msg, ctxt)
        log = WireLog(out_dir / WIRE_LOG)
        stage = secagg_stage(msg)
        log.append(
            message_record(
                msg, node=ctxt.node_id, direction="down", stage=stage, payload_bytes=payload_bytes(msg)
            )
        )
        reply = call_next(msg, ctxt)
        log.append(
            message_record(
                reply, node=ctxt.node_id, direction="up", stage=stage, payload_bytes=payload_bytes(reply)
            )
        )
        return reply

    def capture_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        out_dir = folder(ctxt)
        reply = call_next(msg, ctxt)
        if out_dir is None or msg.metadata.message_type != MessageType.TRAIN or reply.has_error():
            return reply
        fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
        fitres = compat.recorddict_to_fitres(reply.content, keep_input=True)
        server_round = int(fitins.config.get(instructions.ROUND, 0))
        sent = parameters_to_ndarrays(fitres.parameters)
        if fitins.config.get(instructions.HEAD_STATS, False):  # head-fit's statistics, not an update
            moments = fitins.config.get(instructions.HEAD_MOMENTS, False)
            name = head_stats_round_name(server_round, HEAD_MOMENTS_LABEL if moments else HEAD_STATS_LABEL)
            frame = fitins.config.get(instructions.HEAD_FRAME)
            if isinstance(frame, bytes):  # the frame follows the statistics: [..., centre, scale]
                from fedtune.common.head_fit import StatisticsFrame  # torch: not for key exchange alone

                decoded = StatisticsFrame.from_bytes(frame)
                sent += [decoded.centre, decoded.scale]
        else:
            save_arrays(out_dir / global_round_name(server_round), parameters_to_ndarrays(fitins.parameters))
            name = sent_round_name(server_round)
        save_arrays(out_dir / name, sent, num_examples=fitres.num_examples, node=ctxt.node_id)
        return reply

    return wire_mod, capture_mod
