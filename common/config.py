"""The one typed run configuration of fedtune.

Flower hands a run its configuration as a flat mapping of kebab-case keys
(``[tool.flwr.app.config]`` in ``pyproject.toml``, fused with ``--run-config``
overrides). :func:`parse_run_config` turns that mapping into one frozen
:class:`FedConfig` exactly once; everything downstream takes the typed fields it
needs. An unknown key or a value outside its allowed set is an error that lists
what is valid.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shlex
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import options
from .config_rules import ConfigError, check_rules
from .options import GENERATIVE_TASKS


def _opt(default: Any, help: str, **kw: Any) -> Any:  # noqa: A002 - mirrors peft's field help
    return field(default=default, metadata={"help": help, **kw})


@dataclass(frozen=True)
class FedConfig:
    """Resolved configuration of one fedtune run (field ``a_b`` is run-config key ``a-b``)."""

    # --- federation -------------------------------------------------------------------
    num_server_rounds: int = _opt(5, "Federated rounds to run.", min=1)
    fraction_train: float = _opt(
        1.0, "Fraction of connected sites sampled to train each round.", min=0.0, max=1.0
    )
    fraction_evaluate: float = _opt(
        1.0, "Fraction of connected sites sampled to evaluate locally.", min=0.0, max=1.0
    )
    min_clients: int = _opt(2, "Sites that must be connected (and sampled) before a round starts.", min=1)
    strategy: str = _opt(
        "fedavg",
        "Server aggregation (Flower's strategies; see `fedtune bench tuning`).",
        choices=options.STRATEGIES,
    )
    fedprox_mu: float = _opt(0.01, "FedProx proximal weight on the PEFT parameters.", min=0.0)
    fedavgm_lr: float = _opt(1.0, "FedAvgM server learning rate (1 with momentum 0 = FedAvg).", min=0.0)
    fedavgm_momentum: float = _opt(0.5, "FedAvgM server momentum.", min=0.0, max=0.999)
    fedopt_eta: float = _opt(1e-2, "FedAdam / FedYogi server learning rate.", min=0.0)
    fedopt_beta_1: float = _opt(0.9, "FedAdam / FedYogi first-moment decay.", min=0.0, max=1.0)
    fedopt_beta_2: float = _opt(0.99, "FedAdam / FedYogi second-moment decay.", min=0.0, max=1.0)
    fedopt_tau: float = _opt(1e-3, "FedAdam / FedYogi adaptivity (epsilon).", min=0.0)
    # --- secure aggregation (Flower SecAgg+) ------------------------------------------
    secure_aggregation: bool = _opt(
        True, "Mask site updates with Flower's SecAgg+ (server sees only the sum)."
    )
    secagg_num_shares: int = _opt(
        3, "SecAgg+ secret shares per site (clamped to the number of sampled sites).", min=3
    )
    secagg_reconstruction_threshold: int = _opt(2, "SecAgg+ shares needed to unmask a dropped site.", min=2)
    secagg_clipping_range: float = _opt(
        8.0, "SecAgg+ clips every weighted value to +-this before quantising.", min=0.0
    )
    secagg_quantization_range: int = _opt(
        2**22, "SecAgg+ quantisation levels (below Flower's modulus range 2^32).", min=2, max=2**32 - 1
    )
    secagg_max_weight: float = _opt(
        0.0, "SecAgg+ weight normaliser; 0 = auto (the run's pooled training examples).", min=0.0
    )
    secagg_timeout: float = _opt(
        1800.0,
        "Seconds SecAgg+ waits for the sites' replies at each stage; a site that has not replied by then "
        "drops out of the round (0 = wait for every site).",
        min=0.0,
    )
    # --- differential privacy ----------------------------------------------------------
    dp_mode: str = _opt(
        "off",
        "Differential privacy: client-level (the whole site is the privacy unit), patient-level "
        "(`example`: one record), or both.",
        choices=options.DP_MODES,
    )
    dp_noise_multiplier: float = _opt(
        1.0, "Noise std as a multiple of `dp-clipping-norm` (on the sum).", min=0.0
    )
    dp_clipping_norm: float = _opt(0.5, "L2 bound on each site's whole adapter update per round.", min=1e-12)
    dp_delta: float = _opt(1e-5, "delta at which epsilon is reported.", min=1e-300, max=0.5)
    dp_target_epsilon: float = _opt(
        0.0, "Stop before a round would exceed this epsilon; 0 = no budget.", min=0.0
    )
    dp_accountant: str = _opt("rdp", "Privacy accountant.", choices=options.ACCOUNTANTS)
    dp_example_noise_multiplier: float = _opt(
        0.0,
        "Patient-level DP-SGD noise std over `dp-example-clipping-norm`; 0 = calibrated at each site to "
        "`dp-example-target-epsilon` over `num-server-rounds`.",
        min=0.0,
    )
    dp_example_clipping_norm: float = _opt(1.0, "L2 bound on each training example's gradient.", min=1e-12)
    dp_example_target_epsilon: float = _opt(
        8.0,
        "Each site's patient-level epsilon budget at `dp-delta`; a site whose next round would pass it "
        "stops training (0 = no budget).",
        min=0.0,
    )
    # --- audit -------------------------------------------------------------------------
    audit: bool = _opt(
        True, "Record every exchanged message and each site's true update under `out-dir`/audit."
    )
    audit_canaries: int = _opt(
        0, "Synthetic canary patients planted at site 0 (each with probability 1/2) for the audit.", min=0
    )
    # --- model and PEFT ---------------------------------------------------------------
    base_model: str = _opt(
        "",
        "Local Hugging Face model directory; empty = packaged all-MiniLM-L6-v2 (a generative task: the "
        "packaged SmolLM2-135M-Instruct, fetched on first use).",
    )
    distribute_base_model: bool = _opt(
        True,
        "Before its first round, send a site that lacks the base model the checkpoint (it verifies the "
        "fingerprint and caches it in its node config `model-cache-dir`).",
    )
    base_model_chunk_mb: int = _opt(
        32,
        "Largest base-model transfer message, in MiB (a tensor larger than this spans messages).",
        min=1,
        max=256,
    )
    base_model_timeout: float = _opt(
        600.0, "Seconds to wait for each site's reply to a base-model transfer message.", min=1.0
    )
    peft_method: str = _opt("lora", "PEFT method trained at the sites.", choices=options.PEFT_METHODS)
    lora_r: int = _opt(8, "LoRA rank.", min=1)
    lora_alpha: int = _opt(16, "LoRA scaling alpha.", min=1)
    lora_dropout: float = _opt(0.05, "LoRA dropout.", min=0.0, max=1.0)
    lora_target_modules: str = _opt("query,value", "Comma-separated module names LoRA adapts.")
    lora_variant: str = _opt(
        "standard", "LoRA variant (Sun et al. 2024 for ffa).", choices=options.LORA_VARIANTS
    )
    prefix_virtual_tokens: int = _opt(10, "Prefix-tuning virtual tokens per layer.", min=1)
    prefix_projection: bool = _opt(
        False,
        "Prefix tuning through an MLP reparametrisation (Li & Liang 2021): steadier training, but the "
        "MLP is trained and exchanged too (about 2M values for MiniLM).",
    )
    max_length: int = _opt(48, "Tokenizer truncation length.", min=8)
    # --- local training ---------------------------------------------------------------
    local_steps: int = _opt(
        30,
        "Optimiser steps per round at each site (batches drawn epoch after epoch): every site does the same "
        "work, so no large site holds a round up.",
        min=0,
    )
    local_epochs: int = _opt(
        0, "When > 0: local epochs per round at each site instead of `local-steps`.", min=0
    )
    batch_size: int = _opt(32, "Local mini-batch size.", min=1)
    learning_rate: float = _opt(5e-3, "Local AdamW peak learning rate (adapter and head).", min=0.0)
    lr_schedule: str = _opt(
        "constant",
        "Local learning rate over the whole run's local steps (driven by the server round; cosine decays "
        "to 0 at the last round's last step).",
        choices=options.LR_SCHEDULES,
    )
    lr_warmup: float = _opt(
        0.0, "Share of the run's local steps spent warming up (cosine).", min=0.0, max=0.5
    )
    weight_decay: float = _opt(0.0, "Local AdamW weight decay.", min=0.0)
    label_skew: str = _opt(
        "logit-adjust", "Label-skew correction in local training.", choices=options.LABEL_SKEW
    )
    logit_adjust_tau: float = _opt(1.0, "Logit adjustment: weight of the log label prior.", min=0.0)
    restricted_softmax_alpha: float = _opt(
        0.5, "Restricted softmax: factor on the logits of labels absent at the site.", min=0.0, max=1.0
    )
    head_fit: str = _opt(
        "auto",
        "How the shared classifier head is made after each round (when it solves the head: an extra "
        "exchange of feature statistics, two under SecAgg+).",
        choices=options.HEAD_FITS,
    )
    head_fit_shrinkage: float = _opt(
        0.1,
        "When `head-fit` solves the head: shrinkage of the within-class covariance towards the identity.",
        min=0.0,
        max=1.0,
    )
    local_head: str = _opt(
        "train", "What a site does with the classifier head in local training.", choices=options.LOCAL_HEADS
    )
    device: str = _opt("auto", "Where sites train.", choices=options.DEVICES)
    # --- data ---------------------------------------------------------------------------
    task: str = _opt("icd10-chapter", "Task.", choices=options.TASKS)
    data_path: str = _opt(
        "", "CSV/JSONL file for task=csv (a deployed site's own file comes from its node config)."
    )
    test_data_path: str = _opt("", "Optional held-out CSV/JSONL the server scores the shared adapter on.")
    text_column: str = _opt(
        "",
        "Text column for task=csv (empty = serialise every other column) or task=instructions "
        "(empty = `instruction`).",
    )
    label_column: str = _opt("label", "Label column for task=csv.")
    response_column: str = _opt("response", "Response column for task=instructions (the answer to learn).")
    prompt_template: str = _opt(
        "",
        "Generative tasks: the prompt around each example's `{text}`; empty = the task's own (recorded in "
        "fedtune.json).",
    )
    max_new_tokens: int = _opt(16, "Generative tasks: most tokens generated per answer when scoring.", min=1)
    labels: str = _opt(
        "", "Comma-separated label names (fixes class ids across sites); empty = from the data."
    )
    max_examples: int = _opt(
        4000, "Stratified subsample of the task's data before splitting; 0 = all.", min=0
    )
    holdout_fraction: float = _opt(
        0.15, "Share kept aside as the server's held-out test set.", min=0.0, max=0.9
    )
    test_fraction: float = _opt(
        0.2, "Share of each site's data kept as its local test split.", min=0.0, max=0.9
    )
    partitioning: str = _opt("dirichlet", "How simulated sites split the data.", choices=options.PARTITIONERS)
    dirichlet_alpha: float = _opt(1.0, "Dirichlet concentration over labels (smaller = more skewed).", gt=0.0)
    specialty_labels: int = _opt(2, "Dominant labels per specialty site.", min=1)
    specialty_share: float = _opt(
        0.8, "Share of a specialty site's data drawn from its dominant labels.", min=0.0, max=1.0
    )
    # --- run ------------------------------------------------------------------------------
    seed: int = _opt(42, "Seed for sampling, partitioning, initialisation and training.")
    out_dir: str = _opt(
        "fedtune-out", "Folder the server writes checkpoints, the adapter, metrics and plots to."
    )
    resume: bool = _opt(
        False,
        "Continue the run in `out-dir` from its last checkpoint (every other key must equal its "
        "run_config.json).",
    )

    def __post_init__(self) -> None:
        check_rules(self)

    @property
    def client_dp(self) -> str:
        """Client-level DP: ``off``, ``central`` or ``distributed`` (``dp-mode`` without ``example``)."""
        mode = self.dp_mode.removeprefix("example").removeprefix("+")
        return mode or "off"

    @property
    def example_dp(self) -> bool:
        """Patient-level DP-SGD at the sites (``dp-mode`` starts with ``example``)."""
        return self.dp_mode.startswith("example")

    def solves_head(self, num_labels: int) -> bool:
        """Whether the coordinator solves the shared head of ``num_labels`` classes (``head-fit``).

        ``auto`` does for a classification task of at least :data:`~.options.AUTO_HEAD_FIT_MIN_LABELS`
        labels without differential privacy: generative tasks have no head, DP does not cover the
        statistics, and with two labels every site holds both, so the averaged head is not diluted
        (measured on Pima diabetes: the solved head is on par, at twice the upload; see the README).
        """
        if self.head_fit == "auto":
            return (
                self.task not in GENERATIVE_TASKS
                and self.dp_mode == "off"
                and num_labels >= options.AUTO_HEAD_FIT_MIN_LABELS
            )
        return self.head_fit == "lda"

    @property
    def target_modules(self) -> tuple[str, ...]:
        """LoRA target module names, parsed from ``lora-target-modules``."""
        return tuple(m.strip() for m in self.lora_target_modules.split(",") if m.strip())

    @property
    def label_names(self) -> tuple[str, ...]:
        """Label names fixed by ``labels`` (empty when taken from the data)."""
        return tuple(x.strip() for x in self.labels.split(",") if x.strip())

    def to_run_config(self) -> dict[str, bool | int | float | str]:
        """Flat kebab-case mapping; ``parse_run_config(c.to_run_config()) == c``."""
        return {key_of(f.name): getattr(self, f.name) for f in dataclasses.fields(self)}

    def save(self, path: Path) -> None:
        """Write the resolved config as JSON (kebab-case keys)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_run_config(), indent=2, sort_keys=True) + "\n")


def key_of(field_name: str) -> str:
    """Run-config key of a :class:`FedConfig` field (``num_server_rounds`` -> ``num-server-rounds``)."""
    return field_name.replace("_", "-")


_FIELDS = {key_of(f.name): f for f in dataclasses.fields(FedConfig)}
_HINTS = typing.get_type_hints(FedConfig)
VALID_KEYS: tuple[str, ...] = tuple(sorted(_FIELDS))


def _coerce(key: str, raw: Any) -> Any:
    f = _FIELDS[key]
    hint = _HINTS[f.name]
    choices = tuple(f.metadata.get("choices", ()))
    text = raw.strip() if isinstance(raw, str) else raw
    try:
        if hint is bool:
            if isinstance(text, bool):
                value: Any = text
            elif str(text).lower() in {"true", "1", "yes"}:
                value = True
            elif str(text).lower() in {"false", "0", "no"}:
                value = False
            else:
                raise ValueError
        elif hint is int:
            number = float(text) if isinstance(text, str) and "e" in text.lower() else text
            if isinstance(number, bool) or (isinstance(number, float) and not number.is_integer()):
                raise ValueError
            value = int(number)
        elif hint is float:
            if isinstance(text, bool) or not math.isfinite(float(text)):
                raise ValueError
            value = float(text)
        else:
            value = str(text)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(
            f"Run-config key `{key}` expects "
            f"{'true/false' if hint is bool else getattr(hint, '__name__', hint)}, "
            f"got {raw!r}."
        ) from None
    if choices and value not in choices:
        raise ConfigError(
            f"Run-config key `{key}` got {value!r}; valid values: {', '.join(map(str, choices))}."
        )
    above = f.metadata.get("gt")
    if above is not None and not value > above:
        raise ConfigError(f"Run-config key `{key}` must be > {above}, got {value!r}.")
    lo, hi = f.metadata.get("min"), f.metadata.get("max")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ConfigError(f"Run-config key `{key}` must be {bounds}, got {value!r}.")
    return value


def config_table() -> str:
    """Every run-config key as a Markdown table: key, default, meaning (with the valid values).

    ``fedtune config`` prints it and README's "Run config" section holds it verbatim.
    """
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for key, f in _FIELDS.items():
        default = ("true" if f.default else "false") if isinstance(f.default, bool) else repr(f.default)
        meaning = f.metadata["help"]
        choices = f.metadata.get("choices")
        if choices:
            meaning += " " + "; ".join(f"`{name}`: {what}" for name, what in choices.items()) + "."
        rows.append(f"| `{key}` | {default} | {meaning} |")
    return "\n".join(rows)


def parse_run_config(run_config: Mapping[str, Any]) -> FedConfig:
    """Parse a flat kebab-case run config into a :class:`FedConfig`.

    Parameters
    ----------
    run_config
        Keys as in ``[tool.flwr.app.config]``; missing keys take the embedded defaults.
        Values may be typed (from TOML) or strings (from the command line).

    Raises
    ------
    ConfigError
        On an unknown key (the message lists every valid key) or a bad value.
    """
    unknown = sorted(set(run_config) - set(_FIELDS))
    if unknown:
        raise ConfigError(
            f"Unknown run-config key(s): {', '.join(f'`{k}`' for k in unknown)}. "
            f"Valid keys: {', '.join(VALID_KEYS)}."
        )
    kwargs = {_FIELDS[k].name: _coerce(k, v) for k, v in run_config.items()}
    return FedConfig(**kwargs)


def parse_overrides(text: str) -> dict[str, str]:
    """Parse ``"key=value key=value"`` (shell-style quoting allowed) into a dict.

    Raises
    ------
    ConfigError
        When an item has no ``=``.
    """
    out: dict[str, str] = {}
    for item in shlex.split(text):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"Run-config item {item!r} is not `key=value` (e.g. `num-server-rounds=3`).")
        out[key.strip()] = value.strip().strip('"').strip("'")
    return out


def defaults() -> dict[str, bool | int | float | str]:
    """The embedded defaults as a flat run config (mirrored in ``pyproject.toml``)."""
    return FedConfig().to_run_config()
