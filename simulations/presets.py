"""Scenario presets for ``fedtune simulate --preset NAME``: hospitals plus run-config overrides."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Preset:
    """A named simulation scenario."""

    description: str
    num_clients: int
    run_config: dict[str, str | int | float | bool] = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    "default": Preset(
        "ICD-10-CM chapter coding, 5 hospitals with Dirichlet(1.0) chapter mixes, LoRA, SecAgg+ "
        "(the main job).",
        num_clients=5,
    ),
    "specialty": Preset(
        "ICD-10-CM chapter coding at 6 specialty hospitals (2 dominant chapters each, 80% of their cases).",
        num_clients=6,
        run_config={"partitioning": "specialty"},
    ),
    "prefix": Preset(
        "The default scenario with prefix tuning (10 virtual tokens) instead of LoRA, at the learning rate "
        "`fedtune bench tuning` chose on validation (1e-2: 0.312 vs 0.233 at 5e-3).",
        num_clients=5,
        run_config={"peft-method": "prefix", "learning-rate": 1e-2},
    ),
    "diabetes": Preset(
        "Pima diabetes risk (rows serialised as text, ROC AUC) at 3 hospitals.",
        num_clients=3,
        run_config={
            "task": "diabetes",
            "partitioning": "iid",
            "max-examples": 0,
            "num-server-rounds": 5,
            "local-epochs": 2,
            "batch-size": 16,
        },
    ),
    "llm": Preset(
        "Generative ICD-10-CM coding: the packaged SmolLM2-135M-Instruct (fetched into the model cache on "
        "first use) learns to write each diagnosis' code, LoRA on its q/v projections at 3 hospitals with "
        "Dirichlet(1.0) chapter mixes; scored by exact, category and valid-code match.",
        num_clients=3,
        run_config={
            "task": "icd10-code",
            "label-skew": "none",
            "lora-target-modules": "q_proj,v_proj",
            "num-server-rounds": 3,
            "local-steps": 15,
            "batch-size": 16,
            "learning-rate": 2e-3,
            "max-examples": 1500,
            "holdout-fraction": 0.1,
            "fraction-evaluate": 0.0,
            "max-new-tokens": 10,
        },
    ),
    "smoke": Preset(
        "A 3-hospital, 2-round check that finishes in about a minute.",
        num_clients=3,
        run_config={"num-server-rounds": 2, "max-examples": 600, "partitioning": "iid", "local-epochs": 1},
    ),
}


def get_preset(name: str) -> Preset:
    """Look up a preset by name.

    Raises
    ------
    KeyError
        Listing every preset.
    """
    if name not in PRESETS:
        raise KeyError(f"Unknown preset {name!r}; presets: {', '.join(PRESETS)}.")
    return PRESETS[name]
