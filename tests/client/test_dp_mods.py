"""Client-level DP mods on real Flower messages: clipping (Flower's) and each site's noise share."""

from __future__ import annotations

import numpy as np
import pytest
from fedtune.client.mods import dp_mod
from fedtune.common import instructions
from fedtune.common.config import FedConfig
from flwr.app import Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.common import Code, FitIns, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat

GLOBAL = [np.zeros((50, 40), np.float32), np.zeros(40, np.float32)]

pytestmark = pytest.mark.usefixtures("task_identity")


def _run(mode: str, update_scale: float, noise_std: float) -> tuple[list[np.ndarray], list[np.ndarray]]:
    cfg = FedConfig(dp_mode=mode, dp_clipping_norm=1.0)
    config = instructions.encode(cfg, 1, "0" * 64, dp_noise_std=noise_std)
    msg = Message(
        content=compat.fitins_to_recorddict(FitIns(ndarrays_to_parameters(GLOBAL), config), keep_input=True),
        dst_node_id=3,
        message_type=MessageType.TRAIN,
    )
    local = [np.full_like(g, update_scale) for g in GLOBAL]

    def client(m: Message, _: Context) -> Message:
        res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(local), 1, {})
        return Message(compat.fitres_to_recorddict(res, keep_input=True), reply_to=m)

    ctxt = Context(run_id=1, node_id=3, node_config={}, state=RecordDict(), run_config={})
    out = dp_mod(msg, ctxt, client)
    return local, parameters_to_ndarrays(compat.recorddict_to_fitres(out.content, keep_input=True).parameters)


def _norm(arrays: list[np.ndarray]) -> float:
    return float(np.sqrt(sum(float((a.astype(np.float64) ** 2).sum()) for a in arrays)))


def test_central_mode_clips_the_update_to_the_norm_and_adds_no_noise() -> None:
    # Execute: an update of norm ~ 45 (2040 values of 1.0)
    local, sent = _run("central", 1.0, noise_std=0.0)

    # Assert
    assert _norm(sent) == pytest.approx(1.0, rel=1e-4)
    assert np.allclose(sent[0] / sent[0].flat[0], 1.0)  # direction kept: a pure rescaling


def test_distributed_mode_adds_this_sites_noise_share_after_clipping() -> None:
    # Execute: a tiny update (no clipping) plus noise of std 0.05
    local, sent = _run("distributed", 1e-4, noise_std=0.05)

    # Assert: the noise is there, with the instructed std, around the clipped update
    noise = np.concatenate([(s - u).ravel() for s, u in zip(sent, local, strict=True)])
    assert noise.std() == pytest.approx(0.05, rel=0.08) and abs(noise.mean()) < 0.01


def test_dp_off_passes_the_update_untouched() -> None:
    # Execute
    local, sent = _run("off", 3.0, noise_std=0.0)

    # Assert
    assert all(np.array_equal(a, b) for a, b in zip(local, sent, strict=True))
