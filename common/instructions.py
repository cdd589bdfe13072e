"""The per-round instruction the coordinator sends with every train/evaluate message.

It carries the resolved run config (so every site trains with exactly the coordinator's
settings, whatever its own defaults), the round, the pinned base-model fingerprint and
the SecAgg+ weight normaliser. All values are flat scalars (Flower ``ConfigRecord``-safe).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .config import VALID_KEYS, FedConfig, parse_run_config

ROUND = "fedtune.round"
BASE_FINGERPRINT = "fedtune.base-fingerprint"
MAX_WEIGHT = "fedtune.secagg-max-weight"
PROXIMAL_MU = "proximal_mu"  # the key Flower's FedProx strategy puts in the fit config


@dataclass(frozen=True)
class Instruction:
    """A decoded instruction."""

    cfg: FedConfig
    server_round: int
    base_fingerprint: str
    max_weight: float
    proximal_mu: float


def encode(cfg: FedConfig, server_round: int, base_fingerprint: str, max_weight: float) -> dict[str, Any]:
    """Flat config dict for one round's messages."""
    return {
        **cfg.to_run_config(),
        ROUND: server_round,
        BASE_FINGERPRINT: base_fingerprint,
        MAX_WEIGHT: float(max_weight),
    }


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
        max_weight=float(config.get(MAX_WEIGHT, 0.0)),
        proximal_mu=float(config.get(PROXIMAL_MU, 0.0)),
    )
