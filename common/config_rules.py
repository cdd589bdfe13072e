"""The run config's rules across keys, checked once when a ``FedConfig`` is built."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .options import GENERATIVE_TASKS, USER_FILE_TASKS

if TYPE_CHECKING:
    from .config import FedConfig


class ConfigError(ValueError):
    """A run-config key or value is invalid; the message names the key and the fix."""


def check_rules(cfg: FedConfig) -> None:
    """Refuse a combination of keys that cannot run together.

    Raises
    ------
    ConfigError
        Naming the keys and the fix.
    """
    for rules in (_federation, _data, _training, _generation):
        rules(cfg)


def _federation(cfg: FedConfig) -> None:
    if cfg.secagg_reconstruction_threshold >= cfg.secagg_num_shares:
        # Flower's SecAggPlusWorkflow refuses the same (its checks at construction)
        raise ConfigError(
            "`secagg-reconstruction-threshold` must be below `secagg-num-shares` "
            f"({cfg.secagg_reconstruction_threshold} >= {cfg.secagg_num_shares}): raise the shares or "
            "lower the threshold."
        )
    if cfg.head_fit == "lda" and cfg.dp_mode != "off":
        raise ConfigError(
            f"`head-fit={cfg.head_fit}` sends each site's feature statistics, which `dp-mode={cfg.dp_mode}` "
            "does not protect: set `head-fit=none` under differential privacy."
        )
    if cfg.example_dp and cfg.strategy == "fedprox":
        raise ConfigError(
            "`dp-mode` includes `example` (DP-SGD clips each example's gradient) but `strategy=fedprox` "
            "adds a proximal term outside that clipping: use another `strategy`."
        )


def _data(cfg: FedConfig) -> None:
    if cfg.task in USER_FILE_TASKS and not cfg.data_path and not cfg.test_data_path:
        # a deployed coordinator has no site data: it scores on `test-data-path`
        raise ConfigError(
            f"`task={cfg.task}` needs `data-path` (a CSV or JSONL file), or `test-data-path` for a "
            "deployed coordinator (each site's file comes from its node config)."
        )
    if cfg.test_data_path and cfg.task not in USER_FILE_TASKS:
        raise ConfigError(
            f"`test-data-path` is for `task` {' or '.join(USER_FILE_TASKS)}; the packaged tasks hold out "
            "`holdout-fraction`."
        )


def _training(cfg: FedConfig) -> None:
    if cfg.local_steps == 0 and cfg.local_epochs == 0:
        raise ConfigError(
            "`local-steps` and `local-epochs` are both 0: a site would not train. Set `local-steps` "
            "(optimiser steps per round, e.g. 30) or `local-epochs` (e.g. 1)."
        )
    if cfg.lora_variant == "ffa" and cfg.peft_method != "lora":
        raise ConfigError(
            f"`lora-variant=ffa` freezes LoRA's A matrices, but `peft-method` is {cfg.peft_method!r}: "
            "use `peft-method=lora` or `lora-variant=standard`."
        )
    if cfg.peft_method == "lora" and not cfg.target_modules:
        raise ConfigError("`lora-target-modules` is empty; give e.g. `query,value`.")


def _generation(cfg: FedConfig) -> None:
    if cfg.prompt_template and "{text}" not in cfg.prompt_template:
        raise ConfigError(
            f"`prompt-template` {cfg.prompt_template!r} has no `{{text}}`: mark where each example's text "
            "goes, e.g. `Diagnosis: {text}\\nICD-10-CM code:`."
        )
    if cfg.task not in GENERATIVE_TASKS:
        return
    if cfg.head_fit == "lda":
        raise ConfigError(
            f"`head-fit={cfg.head_fit}` solves a classifier head, but `task={cfg.task}` generates its answer "
            "with a causal LM: set `head-fit=none`."
        )
    if cfg.local_head == "frozen":
        raise ConfigError(
            f"`local-head={cfg.local_head}` keeps a classifier head fixed, but `task={cfg.task}` generates "
            "its answer with a causal LM: set `local-head=train`."
        )
    if cfg.label_skew != "none":
        raise ConfigError(
            f"`label-skew={cfg.label_skew}` corrects a classifier's logits, but `task={cfg.task}` generates "
            "its answer with a causal LM: set `label-skew=none` (the `llm` preset does)."
        )
