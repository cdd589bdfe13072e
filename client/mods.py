"""Client mods, outermost first: wire record, (base model), SecAgg+ routing, update capture, client-level DP.

``make_client_app`` stacks them as ``[wire_record, base_model, secure_aggregation, capture_update, dp]``:
the wire record sees exactly what crosses the network (masked vectors under SecAgg+), the
capture sees what SecAgg+ is about to mask (after clipping and noise), and the DP mod works
on the plain update the site trained.
"""

from __future__ import annotations

from typing import cast

import numpy as np
from fedtune.common import instructions
from fedtune.common.secagg_wire import narrow
from fedtune.common.site_config import site_config
from fedtune.common.site_errors import SecAggRequiredError, UpdateRefusedError
from fedtune.common.updates import moments_defect, statistics_defect, update_defect
from flwr.app import Context, Message
from flwr.app.message_type import MessageType
from flwr.client.mod import fixedclipping_mod, secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import (
    FitIns,
    bytes_to_ndarray,
    ndarray_to_bytes,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key
from flwr.compat.common import recorddict_compat as compat


def check_secagg_range(
    arrays: list[np.ndarray], num_examples: int, max_weight: float, clip: float, what: str = "adapter value"
) -> None:
    """Refuse an upload that SecAgg+ would silently distort.

    SecAgg+ multiplies each value by ``num_examples / max_weight`` and clips it to
    ``[-clip, clip]`` before quantising; either overflow would corrupt the aggregate. ``what``: what
    the arrays hold, for the message.

    Raises
    ------
    UpdateRefusedError
        Naming the setting to raise.
    """
    if num_examples > max_weight:
        raise UpdateRefusedError(
            f"Site has {num_examples} training examples > SecAgg+ `secagg-max-weight` {max_weight:g}: "
            "its weight would be clipped. Raise `secagg-max-weight` to at least the largest site's count."
        )
    peak = max(float(np.abs(a).max()) for a in arrays if a.size) * num_examples / max_weight
    if peak > clip:
        raise UpdateRefusedError(
            f"Weighted {what} {peak:.3g} exceeds SecAgg+ `secagg-clipping-range` {clip:g} "
            "and would be clipped; raise `secagg-clipping-range`."
        )


def _train_ins(msg: Message) -> FitIns:
    return compat.recorddict_to_fitins(msg.content, keep_input=True)


def secure_aggregation_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Run train messages of a SecAgg+ round through ``secaggplus_mod``; pass others through.

    Before SecAgg+ masks the site's reply, the update must be a finite adapter of the shapes
    the site received, or finite head statistics (or feature moments) when it answers a
    head-statistics request (the
    coordinator cannot check a masked update), and its values must fit
    SecAgg+'s weight normaliser and clipping range (:func:`check_secagg_range`); otherwise the
    site raises, drops out of the round, and SecAgg+ unmasks the other sites' sum without it. The
    masked vector leaves as the narrowest unsigned dtype of SecAgg+'s modulus range
    (:func:`narrow_masked_reply`). A
    site whose node config sets ``require-secure-aggregation=true`` refuses a train message
    outside a SecAgg+ round, so its update is never sent unmasked.

    Raises
    ------
    SecAggRequiredError
        On an unmasked train request to a site that requires SecAgg+.
    UpdateRefusedError
        When the update is not a finite adapter of the received shapes, or does not fit SecAgg+.
    """
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, ctxt)
    if RECORD_KEY_CONFIGS not in msg.content.config_records:
        if site_config(ctxt.node_config).require_secure_aggregation:
            raise SecAggRequiredError(
                f"Node {ctxt.node_id} requires secure aggregation (`require-secure-aggregation`) but the "
                "server asked for an unmasked update; set `secure-aggregation=true` on the server."
            )
        return call_next(msg, ctxt)

    def checked(inner: Message, context: Context) -> Message:
        ins = _train_ins(inner)
        shapes = [a.shape for a in parameters_to_ndarrays(ins.parameters)]
        head_stats = bool(ins.config.get(instructions.HEAD_STATS, False))
        moments = head_stats and bool(ins.config.get(instructions.HEAD_MOMENTS, False))
        out = call_next(inner, context)
        if not out.has_error():
            state = context.state.config_records[RECORD_KEY_STATE]
            fitres = compat.recorddict_to_fitres(out.content, keep_input=True)
            arrays = parameters_to_ndarrays(fitres.parameters)
            defect = (
                moments_defect(arrays)
                if moments
                else statistics_defect(arrays)
                if head_stats
                else update_defect(arrays, shapes)
            )
            if defect:
                raise UpdateRefusedError(
                    f"Node {context.node_id} refuses to mask its update: {defect}. It drops out of this "
                    "SecAgg+ round; check its data and `learning-rate`."
                )
            check_secagg_range(
                arrays,
                fitres.num_examples,
                cast(float, state["max_weight"]),
                cast(float, state["clipping_range"]),
                "head statistic" if head_stats else "adapter value",
            )
        return out

    out = secaggplus_mod(msg, ctxt, checked)
    if not out.has_error():
        narrow_masked_reply(out, cast(int, ctxt.state.config_records[RECORD_KEY_STATE]["mod_range"]))
    return out


def narrow_masked_reply(out: Message, mod_range: int) -> None:
    """Re-encode a SecAgg+ reply's masked vector (if it has one) in :func:`fedtune.common.secagg_wire.narrow`.

    Flower serialises it as int64; every value lies in ``[0, mod_range)``, so uint32 at Flower's default
    modulus range halves the upload. The coordinator widens it back (:mod:`fedtune.server.wire`).
    """
    replies = out.content.config_records[RECORD_KEY_CONFIGS]
    if Key.MASKED_PARAMETERS in replies:
        masked = [bytes_to_ndarray(b) for b in cast(list[bytes], replies[Key.MASKED_PARAMETERS])]
        replies[Key.MASKED_PARAMETERS] = [ndarray_to_bytes(narrow(a, mod_range)) for a in masked]


def dp_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Client-level DP on the site's update, as the instruction's ``dp-mode`` says.

    ``central``: Flower's ``fixedclipping_mod`` clips the update (local minus global) to
    ``dp-clipping-norm``; the server's ``DifferentialPrivacyClientSideFixedClipping`` adds the noise.
    ``distributed``: the same clipping, then this site adds its share ``N(0, sigma^2 C^2 / n)`` of the
    noise, so the SecAgg+ sum of the ``n`` sampled sites carries the full ``N(0, sigma^2 C^2)`` and the
    server never sees an unnoised sum.
    """
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, ctxt)
    ins = instructions.decode(_train_ins(msg).config)
    if ins.cfg.client_dp == "off":
        return call_next(msg, ctxt)
    out = fixedclipping_mod(msg, ctxt, call_next)
    std = ins.dp_noise_std
    if ins.cfg.client_dp != "distributed" or out.has_error() or std == 0.0:
        return out
    fitres = compat.recorddict_to_fitres(out.content, keep_input=True)
    rng = np.random.default_rng()  # fresh OS entropy every round; never seeded from the run config
    noised = [
        (a + rng.normal(0.0, std, size=a.shape)).astype(a.dtype)
        for a in parameters_to_ndarrays(fitres.parameters)
    ]
    fitres.parameters = ndarrays_to_parameters(noised)
    out.content = compat.fitres_to_recorddict(fitres, keep_input=True)
    return out
