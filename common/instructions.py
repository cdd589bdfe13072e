"""The per-round instruction the coordinator sends with every train/evaluate message.

It carries the resolved run config (so every site trains with exactly the coordinator's
settings, whatever its own defaults), the round, the pinned base-model fingerprint and,
under client-level DP, the clipping norm and each site's share of the noise. All values
are flat scalars (Flower ``ConfigRecord``-safe).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .config import VALID_KEYS, FedConfig, parse_run_config

ROUND = "fedtune.round"
BASE_FINGERPRINT = "fedtune.base-fingerprint"
FROZEN_FINGERPRINT = "fedtune.frozen-adapter-fingerprint"  # FFA-LoRA's shared A (absent otherwise)
DP_NOISE_STD = "fedtune.dp-noise-std"  # std of the Gaussian noise one site adds (distributed DP)
PROXIMAL_MU = "proximal_mu"  # the key Flower's FedProx strategy puts in the fit config
CLIPPING_NORM = "clipping_norm"  # the key Flower's `fixedclipping_mod` reads
HEAD_STATS = "fedtune.head-stats"  # a train message asking for head statistics, not training (head-fit)
HEAD_FRAME = "fedtune.head-frame"  # the coordinates of those statistics (head_fit.StatisticsFrame bytes)
HEAD_MOMENTS = "fedtune.head-moments"  # with HEAD_STATS: the features' moments only (head_fit.FeatureMoments)


@dataclass(frozen=True)
class Instruction:
    """A decoded instruction."""

    cfg: FedConfig
    server_round: int
    base_fingerprint: str
    dp_noise_std: float
    proximal_mu: float
    frozen_fingerprint: str = ""
    head_stats: bool = False
    head_frame: bytes = b""
    head_moments: bool = False


def encode(
    cfg: FedConfig,
    server_round: int,
    base_fingerprint: str,
    *,
    dp_noise_std: float = 0.0,
    frozen_fingerprint: str = "",
) -> dict[str, Any]:
    """Flat config dict for one round's messages."""
    out: dict[str, Any] = {**cfg.to_run_config(), ROUND: server_round, BASE_FINGERPRINT: base_fingerprint}
    if frozen_fingerprint:
        out[FROZEN_FINGERPRINT] = frozen_fingerprint
    if cfg.client_dp != "off":
        out |= {CLIPPING_NORM: cfg.dp_clipping_norm, DP_NOISE_STD: float(dp_noise_std)}
    return out


def decode(config: Mapping[str, Any]) -> Instruction:
    """Parse an instruction received by a site.

    Raises
    ------
    ValueError
        When the fingerprint or round is missing (the sender is not a fedtune coordinator).
    """
    for key in (ROUND, BASE_FINGERPRINT):
        if key not in config:
            raise ValueError(
                f"Instruction lacks `{key}`: the coordinator is not a fedtune server of this version."
            )
    return Instruction(
        cfg=parse_run_config({k: v for k, v in config.items() if k in VALID_KEYS}),
        server_round=int(config[ROUND]),
        base_fingerprint=str(config[BASE_FINGERPRINT]),
        dp_noise_std=float(config.get(DP_NOISE_STD, 0.0)),
        proximal_mu=float(config.get(PROXIMAL_MU, 0.0)),
        frozen_fingerprint=str(config.get(FROZEN_FINGERPRINT, "")),
        head_stats=bool(config.get(HEAD_STATS, False)),
        head_frame=bytes(config.get(HEAD_FRAME, b"")),
        head_moments=bool(config.get(HEAD_MOMENTS, False)),
    )
