"""A site (ClientApp side) driven directly: fingerprint refusal, what it returns, the SecAgg mod."""

from __future__ import annotations

import numpy as np
import pytest
from fedtune.client import site as site_module
from fedtune.client.mods import secure_aggregation_mod
from fedtune.client.site import SiteClient
from fedtune.common import instructions
from fedtune.common.adapters import adapter_names, frozen_adapter_fingerprint, get_adapter_arrays
from fedtune.common.base_files import FingerprintMismatchError, fingerprint, resolve_model_dir
from fedtune.common.config import parse_run_config
from fedtune.common.model import PeftSpec, build_peft_model
from fedtune.common.site_config import SiteConfig
from fedtune.common.sites import simulated_site
from fedtune.common.train import TrainResult
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType

CFG = parse_run_config({"max-examples": 300, "partitioning": "iid", "max-length": 16, "seed": 3})
NODE = {"partition-id": 1, "num-partitions": 3}

pytestmark = pytest.mark.usefixtures("task_identity")


@pytest.fixture(scope="module")
def start() -> tuple[list[np.ndarray], list[str]]:
    model = build_peft_model(PeftSpec.from_config(CFG, resolve_model_dir(""), 22))
    return get_adapter_arrays(model), adapter_names(model)


def test_site_refuses_a_foreign_base_model_naming_both_fingerprints(start, tmp_path) -> None:
    # Prepare: the site's own base model (node config) is not the one the coordinator pinned
    arrays, _ = start
    foreign = "f" * 64
    config = instructions.encode(CFG, 1, foreign)
    node = {**NODE, "base-model": str(resolve_model_dir("")), "model-cache-dir": str(tmp_path)}

    # Execute / Assert
    with pytest.raises(FingerprintMismatchError) as err:
        SiteClient(SiteConfig.parse(node)).fit(arrays, config)
    assert foreign in str(err.value) and fingerprint(resolve_model_dir("")) in str(err.value)


def test_site_lacking_the_pinned_model_refuses_to_train(start, tmp_path) -> None:
    # Prepare: no node-config model, an empty cache, and the packaged model is not the pinned one
    arrays, _ = start
    config = instructions.encode(CFG, 1, "f" * 64)

    # Execute / Assert
    with pytest.raises(FileNotFoundError, match="no base model with fingerprint f{64}"):
        SiteClient(SiteConfig.parse({**NODE, "model-cache-dir": str(tmp_path)})).fit(arrays, config)


def test_site_returns_only_a_trained_adapter_of_the_same_shapes(start) -> None:
    # Prepare
    arrays, names = start
    config = instructions.encode(CFG, 1, fingerprint(resolve_model_dir("")))

    # Execute
    new, num_examples, metrics = SiteClient(SiteConfig.parse(NODE)).fit([a.copy() for a in arrays], config)

    # Assert: same tensors (PEFT state only), changed values, examples counted (not batches)
    assert [a.shape for a in new] == [a.shape for a in arrays]
    assert all("lora_" in n or "classifier" in n for n in names)
    assert any(not np.array_equal(a, b) for a, b in zip(new, arrays, strict=True))
    assert 50 < num_examples < 300 and metrics["train_loss"] > 0


def test_site_trains_at_the_round_of_its_instruction(start, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: record what the site hands to local training
    arrays, _ = start
    calls: list[dict] = []

    def fake_train_local(model, tokenizer, ds, cfg, **kwargs):  # noqa: ANN001, ANN202
        calls.append(kwargs)
        return TrainResult(loss=1.0, examples=len(ds), steps=cfg.local_steps, seconds=1.0)

    monkeypatch.setattr(site_module, "train_local", fake_train_local)
    config = instructions.encode(CFG, 4, fingerprint(resolve_model_dir("")))

    # Execute
    _, _, metrics = SiteClient(SiteConfig.parse(NODE)).fit(arrays, config)

    # Assert: the schedule's round and the reported steps come from this round's instruction
    assert calls[0]["server_round"] == 4 and calls[0]["seed"] == CFG.seed + 4
    assert metrics["train_steps"] == CFG.local_steps


def test_site_evaluate_scores_its_local_test_split(start) -> None:
    # Prepare
    arrays, _ = start
    config = instructions.encode(CFG, 1, fingerprint(resolve_model_dir("")))

    # Execute
    loss, n, metrics = SiteClient(SiteConfig.parse(NODE)).evaluate(arrays, config)

    # Assert: every example of this site's local split, none of its training data
    split = simulated_site(CFG, 1, 3).test
    assert n == len(split) > 0 and loss > 0 and 0 <= metrics["accuracy"] <= 1 and "macro_f1" in metrics


@pytest.mark.parametrize(
    ("overrides", "weight", "mu"),
    [
        ({}, "examples", 0.0),
        ({"strategy": "fedprox", "fedprox-mu": 0.3}, "examples", 0.3),
        ({"dp-mode": "central"}, 1, 0.0),
    ],
)
def test_site_trains_from_the_coordinators_adapter_with_its_settings(
    start, monkeypatch: pytest.MonkeyPatch, overrides: dict, weight: object, mu: float
) -> None:
    # Prepare: the coordinator's adapter differs from the site's cached model; record what training gets
    arrays, _ = start
    sent = [a + 0.25 for a in arrays]
    cfg = parse_run_config({**CFG.to_run_config(), **overrides})
    seen: list[tuple[list[np.ndarray], dict]] = []

    def fake_train_local(model, tokenizer, ds, cfg, **kwargs):  # noqa: ANN001, ANN202
        seen.append((get_adapter_arrays(model), kwargs))
        return TrainResult(loss=1.0, examples=len(ds), steps=1, seconds=1.0)

    monkeypatch.setattr(site_module, "train_local", fake_train_local)
    config = instructions.encode(cfg, 1, fingerprint(resolve_model_dir("")))
    if "fedprox-mu" in overrides:  # Flower's FedProx puts its proximal_mu into the fit config
        config = {**config, instructions.PROXIMAL_MU: cfg.fedprox_mu}

    # Execute
    _, num_examples, _ = SiteClient(SiteConfig.parse(NODE)).fit(sent, config)

    # Assert: training starts from the adapter sent; FedProx's mu reaches it; DP weighs every site 1
    start_arrays, kwargs = seen[0]
    assert all(np.array_equal(a, b) for a, b in zip(start_arrays, sent, strict=True))
    assert kwargs["proximal_mu"] == mu
    expected = len(simulated_site(cfg, 1, 3).train) if weight == "examples" else weight
    assert num_examples == expected


def _train_message(with_secagg: bool) -> Message:
    content = RecordDict({"secaggplus_configs": ConfigRecord({"stage": "setup"})} if with_secagg else {})
    return Message(content=content, dst_node_id=7, message_type=MessageType.TRAIN)


def test_mod_refuses_unmasked_training_when_the_site_requires_secagg() -> None:
    # Prepare
    ctxt = Context(
        run_id=1,
        node_id=7,
        node_config={"require-secure-aggregation": "true"},
        state=RecordDict(),
        run_config={},
    )
    called = []

    # Execute / Assert
    with pytest.raises(PermissionError, match="require-secure-aggregation"):
        secure_aggregation_mod(_train_message(False), ctxt, lambda m, c: called.append(m))
    assert not called


def test_mod_passes_unmasked_training_through_when_not_required() -> None:
    # Prepare
    ctxt = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    called = []

    # Execute
    secure_aggregation_mod(_train_message(False), ctxt, lambda m, c: called.append(m) or m)

    # Assert
    assert len(called) == 1


FFA = parse_run_config({**CFG.to_run_config(), "lora-variant": "ffa"})


def test_ffa_site_trains_when_its_frozen_a_is_the_coordinators() -> None:
    # Prepare: the coordinator's model (same spec) gives the A fingerprint it sends
    model = build_peft_model(PeftSpec.from_config(FFA, resolve_model_dir(""), 22))
    sent = frozen_adapter_fingerprint(model)
    config = instructions.encode(FFA, 1, fingerprint(resolve_model_dir("")), frozen_fingerprint=sent)

    # Execute
    new, _, _ = SiteClient(SiteConfig.parse(NODE)).fit(get_adapter_arrays(model), config)

    # Assert: B and the head only, and A still the one the coordinator fingerprinted
    assert len(sent) == 64 and not any("lora_A" in n for n in adapter_names(model))
    assert len(new) == len(adapter_names(model)) and frozen_adapter_fingerprint(model) == sent


def test_ffa_site_refuses_a_frozen_a_other_than_the_coordinators() -> None:
    # Prepare
    model = build_peft_model(PeftSpec.from_config(FFA, resolve_model_dir(""), 22))
    config = instructions.encode(FFA, 1, fingerprint(resolve_model_dir("")), frozen_fingerprint="e" * 64)

    # Execute / Assert
    with pytest.raises(FingerprintMismatchError, match="frozen LoRA A matrices .* coordinator's e{64}"):
        SiteClient(SiteConfig.parse(NODE)).fit(get_adapter_arrays(model), config)


def test_a_standard_lora_site_has_no_frozen_fingerprint(start) -> None:
    arrays, _ = start
    model = build_peft_model(PeftSpec.from_config(CFG, resolve_model_dir(""), 22))
    assert frozen_adapter_fingerprint(model) == ""
    config = instructions.encode(CFG, 1, fingerprint(resolve_model_dir("")), frozen_fingerprint="e" * 64)
    with pytest.raises(FingerprintMismatchError, match="have fingerprint none"):
        SiteClient(SiteConfig.parse(NODE)).fit(arrays, config)
