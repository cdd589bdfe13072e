"""A hospital site as a Flower ``NumPyClient``: converts messages to calls into ``fedtune.common``."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from fedtune.common import instructions
from fedtune.common.adapters import frozen_adapter_fingerprint, get_adapter_arrays, set_adapter_arrays
from fedtune.common.base_files import FingerprintMismatchError
from fedtune.common.config import FedConfig
from fedtune.common.dp_sgd import SITE_LABEL, example_dp, site_metrics
from fedtune.common.head_fit import StatisticsFrame, site_moments, site_statistics
from fedtune.common.model import bring_up
from fedtune.common.site_config import SiteConfig
from fedtune.common.sites import SiteData, site_data
from fedtune.common.train import evaluate, train_local
from flwr.client import NumPyClient

from .base_model import site_model_dir

log = logging.getLogger(__name__)


class SiteClient(NumPyClient):
    """One site: its private data stays here; only the PEFT state goes back."""

    def __init__(self, site: SiteConfig, default_base_model: str = "", node_id: int = 0) -> None:
        self.site = site
        self.default_base_model = default_base_model  # simulation: the coordinator's (shared) folder
        self.label = site.label(node_id)  # how records name this site

    def _prepare(self, parameters: list[np.ndarray], config: dict[str, Any]):  # noqa: ANN202
        ins = instructions.decode(config)
        model_dir = site_model_dir(self.site, ins.base_fingerprint, self.default_base_model)
        data: SiteData = site_data(ins.cfg, self.site)
        parts = bring_up(ins.cfg, len(data.train.label_names), model_dir)
        local = frozen_adapter_fingerprint(parts.model)
        if local != ins.frozen_fingerprint:
            raise FingerprintMismatchError(
                f"This site's frozen LoRA A matrices (`lora-variant=ffa`) have fingerprint "
                f"{local or 'none'}, the coordinator's {ins.frozen_fingerprint or 'none'}: their seeded "
                "initialisation differs "
                "(another torch version?). Refusing to train: install the coordinator's torch version."
            )
        set_adapter_arrays(parts.model, parameters)
        return ins, data, parts.model, parts.tokenizer, parts.device

    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]):  # noqa: ANN201
        """Train the adapter locally and return it (never the base model, never data).

        A head-statistics request (``head-fit``) trains nothing: the site returns the statistics of its
        training examples under the adapter it received (:func:`~fedtune.common.head_fit.site_statistics`,
        in the frame the request holds), or only their features' moments
        (:func:`~fedtune.common.head_fit.site_moments`).
        """
        ins, data, model, tokenizer, device = self._prepare(parameters, config)
        cfg: FedConfig = ins.cfg
        if ins.head_stats:  # head-fit: the statistics of its examples under the shared adapter, no training
            kw = {"batch_size": cfg.batch_size, "max_length": cfg.max_length, "device": device}
            if ins.head_moments:
                moments = site_moments(model, tokenizer, data.train, **kw)
                return moments.arrays(), moments.examples, {}
            frame = StatisticsFrame.from_bytes(ins.head_frame) if ins.head_frame else None
            stats = site_statistics(model, tokenizer, data.train, frame=frame, **kw)
            return stats.arrays(), stats.examples, {}
        dp = example_dp(cfg, len(data.train)) if cfg.example_dp else None
        epsilon = dp.check_budget(ins.server_round) if dp else 0.0  # refuses a round past the budget
        result = train_local(
            model,
            tokenizer,
            data.train,
            cfg,
            device=device,
            seed=cfg.seed + ins.server_round,
            server_round=ins.server_round,
            proximal_mu=ins.proximal_mu,
            example_dp=dp,
        )
        arrays = get_adapter_arrays(model)
        metrics: dict[str, Any] = {
            "train_loss": result.loss,
            "train_seconds": result.seconds,
            "train_steps": result.steps,
            "examples_per_second": result.examples / result.seconds,
        }
        if dp is not None:
            metrics |= {SITE_LABEL: self.label, **site_metrics(dp, ins.server_round, epsilon)}
        # Client-level DP averages sites uniformly (each site's weight is 1), else weight = examples.
        return arrays, 1 if cfg.client_dp != "off" else len(data.train), metrics

    def evaluate(self, parameters: list[np.ndarray], config: dict[str, Any]):  # noqa: ANN201
        """Score the shared adapter on this site's local test split."""
        ins, data, model, tokenizer, device = self._prepare(parameters, config)
        if len(data.test) == 0:
            return 0.0, 0, {}
        res = evaluate(
            model,
            tokenizer,
            data.test,
            batch_size=ins.cfg.batch_size,
            max_length=ins.cfg.max_length,
            device=device,
            max_new_tokens=ins.cfg.max_new_tokens,
        )
        return res.loss, res.examples, res.as_metrics()
