"""Tests of fedtune.common.config: defaults, pyproject mirror, coercion, bounds, cross-field rules."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import pytest
from fedtune.common import options
from fedtune.common.config import (
    VALID_KEYS,
    ConfigError,
    FedConfig,
    config_table,
    defaults,
    key_of,
    parse_overrides,
    parse_run_config,
)

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


# ---- defaults ------------------------------------------------------------------------------------


def test_defaults_round_trip_through_run_config() -> None:
    # Prepare
    cfg = FedConfig()

    # Execute
    parsed = parse_run_config(cfg.to_run_config())

    # Assert
    assert parsed == cfg
    assert parse_run_config({}) == cfg


def test_non_default_config_round_trips() -> None:
    # Prepare
    cfg = FedConfig(
        strategy="fedadam",
        peft_method="prefix",
        lora_target_modules="",
        task="csv",
        data_path="/data/site.csv",
        test_data_path="/data/test.csv",
        secure_aggregation=False,
        secagg_num_shares=5,
        secagg_reconstruction_threshold=4,
        learning_rate=1e-4,
        seed=7,
    )

    # Execute
    parsed = parse_run_config(cfg.to_run_config())

    # Assert
    assert parsed == cfg


def test_run_config_keys_are_the_kebab_case_field_names() -> None:
    # Prepare
    fields = [f.name for f in dataclasses.fields(FedConfig)]

    # Execute
    keys = list(FedConfig().to_run_config())

    # Assert
    assert keys == [key_of(name) for name in fields]
    assert sorted(keys) == list(VALID_KEYS)
    assert all("_" not in key for key in keys)
    assert key_of("num_server_rounds") == "num-server-rounds"


def test_readme_run_config_table_is_the_one_fedtune_config_prints(capsys) -> None:
    from fedtune.simulations.cli import main

    # Prepare
    readme = (PYPROJECT.parent / "README.md").read_text(encoding="utf-8")
    start = readme.index("| key | default | meaning |")
    documented = readme[start : readme.index("\n\n", start)]

    # Execute
    assert main(["config"]) == 0
    printed = capsys.readouterr().out.strip()

    # Assert: regenerate README's table with `fedtune config` when a key, default or value changes
    assert documented == printed == config_table()
    rows = re.findall(r"^\| `([a-z0-9-]+)` \| ([^|]+) \| (.+) \|$", printed, flags=re.MULTILINE)
    want = {k: ("true" if v else "false") if isinstance(v, bool) else repr(v) for k, v in defaults().items()}
    assert {key: default.strip() for key, default, _ in rows} == want
    assert "`restricted-softmax`: logits of labels absent at the site" in printed


def test_each_option_registry_is_what_the_code_implements() -> None:
    from fedtune.common.model import PEFT_METHODS
    from fedtune.server.strategy import STRATEGIES

    # Assert: a value the config accepts has an implementation, and no implementation is unreachable
    assert list(STRATEGIES) == list(options.STRATEGIES)
    assert list(PEFT_METHODS) == list(options.PEFT_METHODS)
    for key, registry in [
        ("strategy", options.STRATEGIES),
        ("task", options.TASKS),
        ("device", options.DEVICES),
    ]:
        with pytest.raises(ConfigError, match=f"valid values: {', '.join(registry)}"):
            parse_run_config({key: "nope"})


def test_pyproject_app_config_equals_embedded_defaults() -> None:
    # Prepare
    tomllib = pytest.importorskip("tomllib")
    table = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["tool"]["flwr"]["app"]["config"]
    expected = defaults()

    # Execute
    missing = sorted(set(expected) - set(table))
    extra = sorted(set(table) - set(expected))
    wrong = {k: (table[k], v) for k, v in expected.items() if k in table and table[k] != v}
    wrong_type = {
        k: (type(table[k]), type(v))
        for k, v in expected.items()
        if k in table and type(table[k]) is not type(v)
    }

    # Assert
    assert missing == [] and extra == []
    assert wrong == {}
    assert wrong_type == {}
    assert parse_run_config(table) == FedConfig()


# ---- unknown keys and bad choices ----------------------------------------------------------------


def test_unknown_key_error_lists_every_valid_key() -> None:
    # Prepare
    run_config = {"num-server-rounds": 2, "num_rounds": 3}

    # Execute
    with pytest.raises(ConfigError) as excinfo:
        parse_run_config(run_config)

    # Assert
    message = str(excinfo.value)
    assert "`num_rounds`" in message
    assert "Valid keys:" in message
    assert all(key in message for key in VALID_KEYS)


@pytest.mark.parametrize(
    ("key", "value", "valid"),
    [
        ("peft-method", "ia3", ("lora", "prefix")),
        ("task", "mimic", ("icd10-chapter", "diabetes", "csv")),
        ("partitioning", "random", ("iid", "dirichlet", "specialty")),
        ("strategy", "scaffold", ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi")),
        ("lora-variant", "dora", ("standard", "ffa")),
        ("label-skew", "fedlc", ("none", "logit-adjust", "restricted-softmax")),
        ("lr-schedule", "linear", ("constant", "cosine")),
        ("device", "tpu", ("auto", "cpu", "cuda")),
    ],
)
def test_bad_choice_lists_valid_values(key: str, value: str, valid: tuple[str, ...]) -> None:
    # Prepare
    run_config = {key: value}

    # Execute
    with pytest.raises(ConfigError) as excinfo:
        parse_run_config(run_config)

    # Assert
    message = str(excinfo.value)
    assert f"`{key}`" in message and repr(value) in message
    assert all(choice in message for choice in valid)


@pytest.mark.parametrize(
    ("key", "value"),
    [("peft-method", "prefix"), ("task", "diabetes"), ("partitioning", "iid"), ("strategy", "fedprox")],
)
def test_valid_choice_is_accepted(key: str, value: str) -> None:
    # Prepare / Execute
    cfg = parse_run_config({key: value})

    # Assert
    assert getattr(cfg, key.replace("-", "_")) == value


# ---- coercion ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "raw", "expected"),
    [
        ("num-server-rounds", "3", 3),
        ("num-server-rounds", " 12 ", 12),
        ("num-server-rounds", 4.0, 4),
        ("max-examples", "1e3", 1000),
        ("secure-aggregation", "true", True),
        ("secure-aggregation", "TRUE", True),
        ("secure-aggregation", "1", True),
        ("secure-aggregation", "yes", True),
        ("secure-aggregation", "false", False),
        ("secure-aggregation", "0", False),
        ("secure-aggregation", "no", False),
        ("secure-aggregation", False, False),
        ("learning-rate", "1e-3", 1e-3),
        ("learning-rate", 2, 2.0),
        ("fraction-train", "0.5", 0.5),
        ("base-model", " /models/minilm ", "/models/minilm"),
        ("seed", "-1", -1),
    ],
)
def test_string_values_are_coerced_to_the_field_type(key: str, raw: Any, expected: Any) -> None:
    # Prepare
    run_config = {key: raw}

    # Execute
    value = getattr(parse_run_config(run_config), key.replace("-", "_"))

    # Assert
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize(
    ("key", "raw", "expects"),
    [
        ("num-server-rounds", "three", "int"),
        ("num-server-rounds", 2.5, "int"),
        ("num-server-rounds", "2.5", "int"),
        ("lora-r", True, "int"),
        ("secure-aggregation", "maybe", "true/false"),
        ("secure-aggregation", 2, "true/false"),
        ("learning-rate", "fast", "float"),
        ("learning-rate", True, "float"),
    ],
)
def test_uncoercible_value_names_key_and_type(key: str, raw: Any, expects: str) -> None:
    # Prepare
    run_config = {key: raw}

    # Execute
    with pytest.raises(ConfigError) as excinfo:
        parse_run_config(run_config)

    # Assert
    message = str(excinfo.value)
    assert f"`{key}`" in message and f"expects {expects}" in message and repr(raw) in message


def test_fractional_e_notation_int_is_rejected() -> None:
    # Prepare / Execute / Assert
    with pytest.raises(ConfigError, match="num-server-rounds"):
        parse_run_config({"num-server-rounds": "2.5e0"})


def test_overflowing_int_is_a_config_error() -> None:
    # Prepare / Execute / Assert
    with pytest.raises(ConfigError, match="max-examples"):
        parse_run_config({"max-examples": "1e999"})


@pytest.mark.parametrize("key", ["fraction-train", "learning-rate", "lora-dropout"])
def test_nan_is_rejected_for_bounded_floats(key: str) -> None:
    # Prepare / Execute / Assert
    with pytest.raises(ConfigError, match=key):
        parse_run_config({key: "nan"})


# ---- bounds --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "bounds"),
    [
        ("num-server-rounds", 0, ">= 1"),
        ("min-clients", "0", ">= 1"),
        ("fraction-train", 1.5, "in [0.0, 1.0]"),
        ("fraction-evaluate", -0.1, "in [0.0, 1.0]"),
        ("lora-dropout", 1.01, "in [0.0, 1.0]"),
        ("max-length", 7, ">= 8"),
        ("holdout-fraction", 0.95, "in [0.0, 0.9]"),
        ("test-fraction", "0.91", "in [0.0, 0.9]"),
        ("secagg-num-shares", 2, ">= 3"),
        ("secagg-quantization-range", 1, "in [2, 4294967295]"),
        ("secagg-quantization-range", 2**32, "in [2, 4294967295]"),
        ("max-examples", -1, ">= 0"),
        ("learning-rate", "-1e-3", ">= 0.0"),
        ("fedopt-beta-1", 1.5, "in [0.0, 1.0]"),
        ("fedavgm-momentum", 1.0, "in [0.0, 0.999]"),
        ("lr-warmup", 0.6, "in [0.0, 0.5]"),
        ("restricted-softmax-alpha", 1.5, "in [0.0, 1.0]"),
        ("local-steps", -1, ">= 0"),
        ("local-epochs", -1, ">= 0"),
    ],
)
def test_out_of_range_value_names_key_and_bounds(key: str, value: Any, bounds: str) -> None:
    # Prepare
    run_config = {key: value}

    # Execute
    with pytest.raises(ConfigError) as excinfo:
        parse_run_config(run_config)

    # Assert
    message = str(excinfo.value)
    assert f"`{key}`" in message and f"must be {bounds}" in message


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("num-server-rounds", 1),
        ("fraction-train", 0.0),
        ("fraction-train", 1.0),
        ("max-length", 8),
        ("holdout-fraction", 0.9),
        ("max-examples", 0),
        ("secagg-num-shares", 3),
        ("secagg-quantization-range", 2**32 - 1),
    ],
)
def test_bound_values_are_inclusive(key: str, value: Any) -> None:
    # Prepare / Execute
    cfg = parse_run_config({key: value})

    # Assert
    assert getattr(cfg, key.replace("-", "_")) == value


# ---- cross-field rules ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("run_config", "needles"),
    [
        (
            {"secagg-num-shares": 3, "secagg-reconstruction-threshold": 4},
            ("secagg-reconstruction-threshold", "secagg-num-shares", "4 >= 3"),
        ),
        (
            {"secagg-num-shares": 4, "secagg-reconstruction-threshold": 4},
            ("secagg-reconstruction-threshold", "must be below", "4 >= 4"),
        ),
        ({"task": "csv"}, ("task=csv", "data-path")),
        ({"task": "icd10-chapter", "test-data-path": "/t.csv"}, ("test-data-path", "csv or instructions")),
        ({"task": "diabetes", "test-data-path": "/t.csv"}, ("test-data-path",)),
        ({"peft-method": "lora", "lora-target-modules": " , "}, ("lora-target-modules",)),
        ({"local-steps": 0, "local-epochs": 0}, ("local-steps", "local-epochs", "both 0")),
        ({"peft-method": "prefix", "lora-variant": "ffa"}, ("lora-variant=ffa", "peft-method=lora")),
        (
            {"task": "instructions", "label-skew": "none"},
            ("task=instructions", "needs `data-path`", "`test-data-path`"),
        ),
        (
            {"task": "icd10-code", "label-skew": "logit-adjust"},
            ("label-skew=logit-adjust", "task=icd10-code", "set `label-skew=none`"),
        ),
        (
            {"task": "instructions", "data-path": "/d.csv", "label-skew": "restricted-softmax"},
            ("label-skew=restricted-softmax", "task=instructions", "set `label-skew=none`"),
        ),
        (
            {"task": "icd10-code", "label-skew": "none", "head-fit": "lda"},
            ("head-fit=lda", "task=icd10-code", "set `head-fit=none`"),
        ),
        (
            {"task": "icd10-code", "label-skew": "none", "local-head": "frozen"},
            ("local-head=frozen", "task=icd10-code", "set `local-head=train`"),
        ),
        (
            {"head-fit": "lda", "dp-mode": "example"},
            ("head-fit=lda", "dp-mode=example", "set `head-fit=none`"),
        ),
        ({"head-fit": "lda", "dp-mode": "distributed"}, ("head-fit=lda", "dp-mode=distributed")),
        ({"prompt-template": "Diagnosis: {txt}"}, ("prompt-template", "'Diagnosis: {txt}'", "no `{text}`")),
        (
            {"task": "icd10-code", "label-skew": "none", "prompt-template": "Code:"},
            ("prompt-template", "no `{text}`", "e.g. `Diagnosis: {text}"),
        ),
    ],
)
def test_cross_field_error_names_the_keys(run_config: dict[str, Any], needles: tuple[str, ...]) -> None:
    # Prepare / Execute
    with pytest.raises(ConfigError) as excinfo:
        parse_run_config(run_config)

    # Assert
    assert all(needle in str(excinfo.value) for needle in needles)


@pytest.mark.parametrize(
    "run_config",
    [
        {"secagg-num-shares": 4, "secagg-reconstruction-threshold": 3},
        {"task": "csv", "data-path": "/d.csv"},
        {"task": "csv", "data-path": "/d.csv", "test-data-path": "/t.csv"},
        {"peft-method": "prefix", "lora-target-modules": ""},
        {"local-steps": 0, "local-epochs": 2},
        {"local-steps": 5, "local-epochs": 0},
        {"task": "icd10-code", "label-skew": "none"},
        {"task": "icd10-code", "label-skew": "none", "prompt-template": "Q: {text}\nA:", "max-new-tokens": 8},
        {"task": "instructions", "label-skew": "none", "data-path": "/d.jsonl", "response-column": "output"},
        {"task": "instructions", "label-skew": "none", "test-data-path": "/t.jsonl"},
        {"task": "icd10-chapter", "prompt-template": "Diagnosis: {text}"},
        {"task": "icd10-chapter", "audit-canaries": 4},
        {"head-fit": "lda", "peft-method": "prefix", "secure-aggregation": False},
    ],
)
def test_consistent_cross_fields_are_accepted(run_config: dict[str, Any]) -> None:
    # Prepare / Execute
    cfg = parse_run_config(run_config)

    # Assert
    assert cfg.to_run_config() == {**defaults(), **run_config}


@pytest.mark.parametrize(
    ("run_config", "labels", "solves"),
    [
        ({}, 22, True),  # the default, auto, on the default classification task
        ({}, 3, True),
        ({"task": "diabetes"}, 2, False),  # two labels: every site holds both
        ({"dp-mode": "central"}, 22, False),  # DP does not cover the statistics
        ({"dp-mode": "example"}, 22, False),
        ({"task": "icd10-code", "label-skew": "none"}, 22, False),  # a causal LM has no head
        ({"head-fit": "lda"}, 2, True),
        ({"head-fit": "none"}, 22, False),
    ],
)
def test_head_fit_auto_solves_the_head_for_three_labels_or_more_without_dp(
    run_config: dict[str, Any], labels: int, solves: bool
) -> None:
    # Prepare / Execute
    cfg = parse_run_config(run_config)

    # Assert
    assert cfg.solves_head(labels) is solves


def test_cross_field_rules_also_guard_direct_construction() -> None:
    # Prepare / Execute / Assert
    with pytest.raises(ConfigError, match="data-path"):
        FedConfig(task="csv")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("query,value", ("query", "value")), (" query , key ,, value ", ("query", "key", "value")), ("", ())],
)
def test_comma_lists_are_split_and_stripped(text: str, expected: tuple[str, ...]) -> None:
    # Prepare
    cfg = FedConfig(peft_method="prefix", lora_target_modules=text, labels=text)

    # Execute / Assert
    assert cfg.target_modules == expected
    assert cfg.label_names == expected


# ---- overrides -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", {}),
        ("num-server-rounds=3", {"num-server-rounds": "3"}),
        ("num-server-rounds=3  strategy=fedprox", {"num-server-rounds": "3", "strategy": "fedprox"}),
        ('labels="no diabetes,diabetes"', {"labels": "no diabetes,diabetes"}),
        ("text-column='clinical note'", {"text-column": "clinical note"}),
        ('"data-path=/my data/site.csv"', {"data-path": "/my data/site.csv"}),
        ("data-path=/d/a=b.csv", {"data-path": "/d/a=b.csv"}),
        ("base-model=", {"base-model": ""}),
        ("seed=1 seed=2", {"seed": "2"}),
    ],
)
def test_parse_overrides(text: str, expected: dict[str, str]) -> None:
    # Prepare / Execute
    out = parse_overrides(text)

    # Assert
    assert out == expected


@pytest.mark.parametrize("item", ["num-server-rounds", "=3"])
def test_parse_overrides_rejects_item_without_key_value(item: str) -> None:
    # Prepare
    text = f"seed=1 {item}"

    # Execute
    with pytest.raises(ConfigError) as excinfo:
        parse_overrides(text)

    # Assert
    assert repr(item) in str(excinfo.value) and "key=value" in str(excinfo.value)


def test_parse_overrides_rejects_unbalanced_quote() -> None:
    # Prepare / Execute / Assert
    with pytest.raises(ValueError, match="quotation"):
        parse_overrides('labels="a,b')


def test_overrides_feed_parse_run_config() -> None:
    # Prepare
    overrides = parse_overrides(
        "num-server-rounds=3 secure-aggregation=false learning-rate=1e-3 peft-method=prefix"
    )

    # Execute
    cfg = parse_run_config(overrides)

    # Assert
    assert cfg == dataclasses.replace(
        FedConfig(), num_server_rounds=3, secure_aggregation=False, learning_rate=1e-3, peft_method="prefix"
    )


# ---- save ----------------------------------------------------------------------------------------


def test_save_writes_json_that_parses_back(tmp_path: Path) -> None:
    # Prepare
    cfg = FedConfig(strategy="fedprox", fedprox_mu=0.5, num_server_rounds=9, labels="a,b")
    path = tmp_path / "nested" / "config.json"

    # Execute
    cfg.save(path)

    # Assert
    loaded = json.loads(path.read_text())
    assert list(loaded) == sorted(loaded)
    assert loaded == cfg.to_run_config()
    assert parse_run_config(loaded) == cfg


@pytest.mark.parametrize(
    "run_config",
    [
        {"secagg-num-shares": 3, "secagg-reconstruction-threshold": 2},
        {
            "secagg-num-shares": 9,
            "secagg-reconstruction-threshold": 8,
            "secagg-quantization-range": 2**32 - 1,
        },
    ],
)
def test_every_secagg_setting_the_config_accepts_flower_accepts(run_config: dict[str, Any]) -> None:
    from flwr.server.workflow import SecAggPlusWorkflow

    # Prepare
    cfg = parse_run_config(run_config)

    # Execute / Assert: Flower's workflow raises at construction on settings it refuses
    SecAggPlusWorkflow(
        num_shares=cfg.secagg_num_shares,
        reconstruction_threshold=cfg.secagg_reconstruction_threshold,
        quantization_range=cfg.secagg_quantization_range,
    )


@pytest.mark.parametrize(
    "run_config",
    [{"secagg-num-shares": 2}, {"secagg-num-shares": 3, "secagg-reconstruction-threshold": 3}],
)
def test_secagg_settings_flower_refuses_are_refused_by_the_config(run_config: dict[str, Any]) -> None:
    from flwr.server.workflow import SecAggPlusWorkflow

    # Prepare: Flower refuses these
    merged = {"secagg-reconstruction-threshold": 2, **run_config}
    with pytest.raises(ValueError):
        SecAggPlusWorkflow(
            num_shares=merged["secagg-num-shares"],
            reconstruction_threshold=merged["secagg-reconstruction-threshold"],
        )

    # Execute / Assert: so does the config, before any run starts
    with pytest.raises(ConfigError):
        parse_run_config(run_config)
