"""Tests of fedtune.common.train: local training, frozen base, FedProx, scoring, device choice."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fedtune.common.adapters import get_adapter_arrays, set_adapter_arrays
from fedtune.common.config import FedConfig
from fedtune.common.data import TextDataset
from fedtune.common.local_plan import LogitTransform, Schedule
from fedtune.common.model import (
    PeftSpec,
    build_peft_model,
    frozen_head,
    head_layer,
    load_tokenizer,
    select_device,
)
from fedtune.common.train import (
    EvalResult,
    TrainResult,
    autocast_dtype,
    evaluate,
    predict_proba,
    score,
    train,
    train_local,
)
from peft import PeftModel
from sklearn.metrics import f1_score, roc_auc_score
from transformers import PreTrainedTokenizerBase

CPU = torch.device("cpu")
MAX_LENGTH = 16
CLINICAL = [
    "patient reports fever and a dry cough",
    "severe chest pain radiating to the left arm",
    "headache with nausea since yesterday",
    "fractured wrist after a fall on ice",
    "shortness of breath and wheezing at night",
    "rash on both legs with itching",
    "persistent abdominal pain after meals",
    "elevated blood pressure at the last visit",
]
OTHER = [
    "the invoice was paid by bank transfer",
    "stock prices rose sharply this morning",
    "the football match ended in a draw",
    "our flight to paris was delayed again",
    "the car needs new winter tyres",
    "she baked bread with fresh rosemary",
    "the concert tickets sold out in minutes",
    "a new library opened downtown",
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tokenizer(base_dir: Path) -> PreTrainedTokenizerBase:
    return load_tokenizer(base_dir)


@pytest.fixture(scope="module")
def dataset() -> TextDataset:
    texts = CLINICAL * 2 + OTHER * 2
    labels = np.array([1] * (2 * len(CLINICAL)) + [0] * (2 * len(OTHER)))
    return TextDataset(
        texts=tuple(texts),
        labels=labels,
        label_names=("other", "clinical"),
        serialisation="text",
        source="test",
    )


@pytest.fixture(scope="module")
def model_and_start(base_dir: Path) -> tuple[PeftModel, list[np.ndarray]]:
    # A seed of its own: this module trains the process-cached model, no other module gets it.
    model = build_peft_model(PeftSpec.from_config(FedConfig(seed=21), base_dir, num_labels=2))
    return model, get_adapter_arrays(model)


@pytest.fixture
def start(model_and_start: tuple[PeftModel, list[np.ndarray]]) -> list[np.ndarray]:
    """The adapter every test's model starts from (the fixture ``model`` is reset to it)."""
    return model_and_start[1]


@pytest.fixture
def model(model_and_start: tuple[PeftModel, list[np.ndarray]]) -> PeftModel:
    """The module's model, reset to its initial adapter before each test."""
    model, start = model_and_start
    set_adapter_arrays(model, start)
    return model


def _train(
    model: PeftModel, tokenizer: PreTrainedTokenizerBase, ds: TextDataset, **kwargs: Any
) -> TrainResult:
    """:func:`train` with this module's settings (1 epoch of batch 8 at 5e-3, seed 0); ``kwargs`` override."""
    settings = {
        "epochs": 1,
        "batch_size": 8,
        "learning_rate": 5e-3,
        "weight_decay": 0.0,
        "max_length": MAX_LENGTH,
        "device": CPU,
        "seed": 0,
    }
    return train(model, tokenizer, ds, **(settings | kwargs))


def _distance(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return float(np.sqrt(sum(((x - y) ** 2).sum() for x, y in zip(a, b, strict=True))))


# ---- train --------------------------------------------------------------------------------------------


def test_train_moves_every_trainable_and_no_frozen_tensor(
    model: PeftModel, tokenizer: PreTrainedTokenizerBase, dataset: TextDataset
) -> None:
    # Prepare
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}

    # Execute
    result = _train(model, tokenizer, dataset, epochs=2)

    # Assert
    after = model.state_dict()
    assert set(after) == set(before)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == trainable
    assert result.examples == 2 * len(dataset)
    assert np.isfinite(result.loss) and result.seconds > 0
    assert all(p.device == CPU for p in model.parameters())


def test_loss_decreases_on_a_separable_task(
    model: PeftModel, tokenizer: PreTrainedTokenizerBase, dataset: TextDataset
) -> None:
    # Prepare
    kwargs = {"batch_size": 16, "max_length": MAX_LENGTH, "device": CPU}
    start = evaluate(model, tokenizer, dataset, **kwargs)

    # Execute
    losses = [_train(model, tokenizer, dataset, seed=epoch).loss for epoch in range(4)]
    end = evaluate(model, tokenizer, dataset, **kwargs)

    # Assert
    assert losses[-1] < losses[0] / 2
    assert end.loss < start.loss / 4
    assert end.accuracy == 1.0
    assert end.examples == len(dataset)


def test_same_seed_and_start_give_identical_adapters(
    model: PeftModel,
    start: list[np.ndarray],
    tokenizer: PreTrainedTokenizerBase,
    dataset: TextDataset,
) -> None:
    # Execute
    _train(model, tokenizer, dataset, seed=5)
    first = get_adapter_arrays(model)
    set_adapter_arrays(model, start)
    _train(model, tokenizer, dataset, seed=5)
    second = get_adapter_arrays(model)

    # Assert
    assert _distance(first, start) > 0
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))


def test_fedprox_keeps_the_adapter_near_the_global_one(
    model: PeftModel,
    start: list[np.ndarray],
    tokenizer: PreTrainedTokenizerBase,
    dataset: TextDataset,
) -> None:
    # Execute
    free = _train(model, tokenizer, dataset, epochs=2, seed=3, proximal_mu=0.0)
    free_distance = _distance(get_adapter_arrays(model), start)
    set_adapter_arrays(model, start)
    prox = _train(model, tokenizer, dataset, epochs=2, seed=3, proximal_mu=1e4)
    prox_distance = _distance(get_adapter_arrays(model), start)

    # Assert
    assert 0 < prox_distance < free_distance / 4
    assert prox.loss > free.loss  # the reported loss excludes the proximal term, which held it back


def test_scoring_after_each_epoch_leaves_training_unchanged(
    model: PeftModel,
    start: list[np.ndarray],
    tokenizer: PreTrainedTokenizerBase,
    dataset: TextDataset,
) -> None:
    # Prepare: the callback scores the model (moves it to CPU, eval mode), as a learning curve does
    calls: list[tuple[int, bool]] = []
    curve: list[np.ndarray] = []

    def on_epoch_end(epoch: int) -> None:
        calls.append((epoch, model.training))
        curve.append(
            predict_proba(model, tokenizer, dataset, batch_size=16, max_length=MAX_LENGTH, device=CPU)
        )

    # Execute
    _train(model, tokenizer, dataset, epochs=3, seed=7, on_epoch_end=on_epoch_end)
    scored = get_adapter_arrays(model)
    set_adapter_arrays(model, start)
    _train(model, tokenizer, dataset, epochs=3, seed=7)

    # Assert: called once per epoch in train mode; the same adapter as without it (dropout back on)
    assert calls == [(1, True), (2, True), (3, True)]
    assert all(np.array_equal(a, b) for a, b in zip(scored, get_adapter_arrays(model), strict=True))
    final = predict_proba(model, tokenizer, dataset, batch_size=16, max_length=MAX_LENGTH, device=CPU)
    assert np.allclose(curve[-1], final) and not np.allclose(curve[0], final)


def test_train_refuses_an_empty_dataset(model: PeftModel, tokenizer: PreTrainedTokenizerBase) -> None:
    # Prepare
    empty = TextDataset(texts=(), labels=np.zeros(0), label_names=("a", "b"), serialisation="", source="")

    # Execute / Assert
    with pytest.raises(ValueError, match="empty"):
        _train(model, tokenizer, empty)


def test_predict_proba_rows_are_distributions(
    model: PeftModel, tokenizer: PreTrainedTokenizerBase, dataset: TextDataset
) -> None:
    # Prepare
    ds = dataset.subset(np.arange(5))

    # Execute
    probs = predict_proba(model, tokenizer, ds, batch_size=2, max_length=MAX_LENGTH, device=CPU)

    # Assert
    assert probs.shape == (5, 2)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


# ---- score --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("probs", "labels", "num_labels", "accuracy", "auc"),
    [
        # binary: predictions 0, 1, 0, 1; positive scores 0.8, 0.4 vs negative 0.1, 0.7 -> 3 of 4 pairs
        ([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]], [0, 1, 1, 0], 2, 0.5, 0.75),
        # binary, perfectly ranked and classified
        ([[0.9, 0.1], [0.4, 0.6], [0.45, 0.55], [0.7, 0.3]], [0, 1, 1, 0], 2, 1.0, 1.0),
        # binary task but one class only in the truth: AUC undefined
        ([[0.9, 0.1], [0.2, 0.8]], [0, 0], 2, 0.5, None),
        # three classes: no AUC
        ([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4], [0.5, 0.4, 0.1]], [0, 1, 2, 1], 3, 0.75, None),
        # four classes, class 3 never seen nor predicted
        ([[0.7, 0.2, 0.1, 0.0], [0.1, 0.1, 0.8, 0.0], [0.2, 0.5, 0.2, 0.1]], [0, 1, 1], 4, 2 / 3, None),
    ],
)
def test_score_on_hand_made_probabilities(
    probs: list[list[float]], labels: list[int], num_labels: int, accuracy: float, auc: float | None
) -> None:
    # Prepare
    p, y = np.array(probs), np.array(labels)
    expected_loss = -np.mean(np.log(p[np.arange(len(y)), y]))
    expected_f1 = f1_score(y, p.argmax(axis=1), average="macro", zero_division=0)

    # Execute
    result = score(p, y, num_labels)

    # Assert
    assert result.accuracy == pytest.approx(accuracy)
    assert result.macro_f1 == pytest.approx(expected_f1)
    assert result.loss == pytest.approx(expected_loss)
    assert result.examples == len(y)
    if auc is None:
        assert result.auc is None and "auc" not in result.as_metrics()
    else:
        assert result.auc == pytest.approx(auc) == pytest.approx(roc_auc_score(y, p[:, 1]))
        assert result.as_metrics()["auc"] == result.auc


def test_score_macro_f1_by_hand() -> None:
    # Prepare: predictions 0, 1, 0, 2 vs truth 1, 1, 0, 2
    probs = np.array([[0.5, 0.3, 0.2], [0.1, 0.8, 0.1], [0.6, 0.4, 0.0], [0.0, 0.1, 0.9]])
    labels = np.array([1, 1, 0, 2])

    # Execute
    result = score(probs, labels, 3)

    # Assert: F1 = 2tp / (2tp + fp + fn): class 0 2/3 (tp 1, fp 1), class 1 2/3 (tp 1, fn 1), class 2 1
    assert result.accuracy == pytest.approx(3 / 4)
    assert result.macro_f1 == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)


def test_score_clips_zero_probability_loss() -> None:
    # Prepare
    probs = np.array([[1.0, 0.0]])

    # Execute
    result = score(probs, np.array([1]), 2)

    # Assert
    assert result.loss == pytest.approx(-np.log(1e-12))
    assert result.as_metrics() == {"loss": result.loss, "accuracy": 0.0, "macro_f1": 0.0}


def test_score_refuses_empty_labels() -> None:
    # Prepare / Execute / Assert
    with pytest.raises(ValueError, match="empty"):
        score(np.zeros((0, 2)), np.zeros(0, dtype=np.int64), 2)


def test_eval_result_metrics_include_auc_only_when_defined() -> None:
    # Prepare
    with_auc = EvalResult(loss=0.1, accuracy=0.9, macro_f1=0.8, auc=0.95, examples=10)
    without = EvalResult(loss=0.1, accuracy=0.9, macro_f1=0.8, auc=None, examples=10)

    # Execute / Assert
    assert with_auc.as_metrics() == {"loss": 0.1, "accuracy": 0.9, "macro_f1": 0.8, "auc": 0.95}
    assert without.as_metrics() == {"loss": 0.1, "accuracy": 0.9, "macro_f1": 0.8}


# ---- device ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("preference", "expected"),
    [("cpu", "cpu"), ("auto", "cuda" if torch.cuda.is_available() else "cpu")],
)
def test_select_device(preference: str, expected: str) -> None:
    # Prepare / Execute
    device = select_device(preference)

    # Assert
    assert device.type == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is visible")
def test_select_cuda_without_gpu_raises() -> None:
    # Prepare / Execute / Assert
    with pytest.raises(RuntimeError, match="device=cuda"):
        select_device("cuda")


def test_no_autocast_on_cpu() -> None:
    # Prepare / Execute / Assert
    assert autocast_dtype(CPU) is None


# ---- local steps, schedule and label-skew correction ---------------------------------------------------


@pytest.fixture
def lrs(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The learning rate of every AdamW step taken while the test runs, in order."""
    seen: list[float] = []
    step = torch.optim.AdamW.step

    def recording_step(self: torch.optim.AdamW, *args: object, **kwargs: object) -> object:
        seen.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    return seen


def test_steps_make_exactly_that_many_optimiser_steps_across_epochs(
    model: PeftModel, tokenizer: PreTrainedTokenizerBase, dataset: TextDataset, lrs: list[float]
) -> None:
    # Prepare: 32 examples, batch 8 -> 4 steps per epoch; 11 steps = 2 whole epochs + 3 batches
    epochs_done: list[int] = []

    # Execute
    result = _train(model, tokenizer, dataset, steps=11, on_epoch_end=epochs_done.append)

    # Assert
    assert len(lrs) == 11 and result.steps == 11
    assert result.examples == 11 * 8
    assert epochs_done == [1, 2]  # only whole epochs are reported


def test_epochs_without_steps_take_every_batch_of_each_epoch(
    model: PeftModel, tokenizer: PreTrainedTokenizerBase, dataset: TextDataset, lrs: list[float]
) -> None:
    result = _train(model, tokenizer, dataset, epochs=3)
    assert len(lrs) == result.steps == 3 * 4


def test_the_schedule_sets_each_steps_learning_rate(
    model: PeftModel, tokenizer: PreTrainedTokenizerBase, dataset: TextDataset, lrs: list[float]
) -> None:
    # Prepare: the second of two rounds of 4 steps, cosine over the run's 8 steps, 2 of warm-up
    schedule = Schedule("cosine", total=8, warmup=2, offset=4)

    # Execute
    _train(model, tokenizer, dataset, steps=4, learning_rate=0.01, schedule=schedule)

    # Assert
    assert lrs == pytest.approx([0.01 * schedule.factor(s) for s in range(4)])
    assert lrs[0] < 0.01 and lrs == sorted(lrs, reverse=True)


def test_a_zero_schedule_leaves_the_adapter_where_it_was(
    model: PeftModel,
    start: list[np.ndarray],
    tokenizer: PreTrainedTokenizerBase,
    dataset: TextDataset,
) -> None:
    # Prepare: a schedule past its end gives every step factor 0
    spent = Schedule("cosine", total=4, offset=4)

    # Execute
    _train(model, tokenizer, dataset, steps=3, learning_rate=0.05, schedule=spent)

    # Assert
    assert _distance(get_adapter_arrays(model), start) == 0.0


def test_the_training_loss_uses_the_transformed_logits(
    model: PeftModel, tokenizer: PreTrainedTokenizerBase, dataset: TextDataset
) -> None:
    # Prepare: a transform that makes every example's true label win by a mile (labels are 0/1 by half)
    half = len(dataset) // 2
    one_label = dataclasses.replace(dataset, texts=dataset.texts[:half], labels=dataset.labels[:half])
    assert set(one_label.labels.tolist()) == {1}
    winning = LogitTransform(scale=torch.ones(2), offset=torch.tensor([0.0, 40.0]))

    # Execute
    plain = _train(model, tokenizer, one_label, steps=1, learning_rate=1e-3)
    adjusted = _train(model, tokenizer, one_label, steps=1, learning_rate=1e-3, logit_transform=winning)

    # Assert
    assert plain.loss > 0.1
    assert adjusted.loss < 1e-6


def test_train_local_follows_the_round_its_site_is_in(
    model: PeftModel, tokenizer: PreTrainedTokenizerBase, dataset: TextDataset, lrs: list[float]
) -> None:
    # Prepare: 2 rounds of 3 local steps, cosine, logit adjustment on the site's labels
    cfg = FedConfig(
        num_server_rounds=2,
        local_steps=3,
        batch_size=8,
        learning_rate=0.02,
        lr_schedule="cosine",
        label_skew="logit-adjust",
        max_length=MAX_LENGTH,
    )

    # Execute
    result = train_local(model, tokenizer, dataset, cfg, device=CPU, seed=0, server_round=2)

    # Assert
    expected = Schedule.for_round(cfg, 2, 3)
    assert expected.offset == 3
    assert result.steps == 3 and lrs == pytest.approx([0.02 * expected.factor(s) for s in range(3)])


def test_train_local_corrects_the_training_logits_with_the_sites_labels(
    model: PeftModel,
    start: list[np.ndarray],
    tokenizer: PreTrainedTokenizerBase,
    dataset: TextDataset,
) -> None:
    # Prepare: a site holding only label 1; logit adjustment with a large tau makes its loss tiny
    half = len(dataset) // 2
    one_label = dataclasses.replace(dataset, texts=dataset.texts[:half], labels=dataset.labels[:half])
    plain_cfg = FedConfig(local_steps=1, batch_size=8, max_length=MAX_LENGTH, label_skew="none")
    skew_cfg = dataclasses.replace(plain_cfg, label_skew="logit-adjust", logit_adjust_tau=20.0)

    # Execute
    plain = train_local(model, tokenizer, one_label, plain_cfg, device=CPU, seed=0, server_round=1)
    set_adapter_arrays(model, start)
    adjusted = train_local(model, tokenizer, one_label, skew_cfg, device=CPU, seed=0, server_round=1)

    # Assert
    assert plain.loss > 0.1 and adjusted.loss < 1e-3


@pytest.mark.parametrize("local_head", ["train", "frozen"])
def test_train_local_trains_the_head_unless_the_run_freezes_it(
    model: PeftModel, tokenizer: PreTrainedTokenizerBase, dataset: TextDataset, local_head: str
) -> None:
    # Prepare
    cfg = FedConfig(
        local_steps=3, batch_size=8, learning_rate=0.02, max_length=MAX_LENGTH, local_head=local_head
    )
    head = head_layer(model)
    head_before = [p.detach().clone() for p in head.parameters()]
    head_ids = {id(p) for p in head.parameters()}
    body = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in head_ids]
    body_before = [p.detach().clone() for _, p in body]

    # Execute
    result = train_local(model, tokenizer, dataset, cfg, device=CPU, seed=0, server_round=1)

    # Assert: the adapter always trains; the head only with local-head=train; trainable again after
    assert result.steps == 3 and body
    assert all(not torch.equal(a, p) for a, (_, p) in zip(body_before, body, strict=True))
    moved = [not torch.equal(a, p) for a, p in zip(head_before, head.parameters(), strict=True)]
    assert moved == ([True, True] if local_head == "train" else [False, False])
    assert all(p.requires_grad for p in head.parameters())


def test_a_frozen_head_counts_as_frozen_and_is_trainable_again_after_a_failure(
    model: PeftModel, tokenizer: PreTrainedTokenizerBase, dataset: TextDataset
) -> None:
    # Prepare: something other than the optimiser touches the frozen head mid-training
    head = head_layer(model)

    def tamper(epoch: int) -> None:
        with torch.no_grad():
            head.bias.add_(1.0)

    # Execute / Assert
    with pytest.raises(RuntimeError, match="A frozen base-model parameter changed"), frozen_head(model):
        _train(model, tokenizer, dataset, on_epoch_end=tamper)
    assert all(p.requires_grad for p in head.parameters())
    with frozen_head(model, frozen=False):
        assert head.bias.requires_grad


def test_a_frozen_base_weight_changed_during_training_is_refused(
    model: PeftModel, tokenizer: PreTrainedTokenizerBase, dataset: TextDataset
) -> None:
    # Prepare: something other than the optimiser touches a frozen base weight mid-training
    name, weight = next((n, p) for n, p in model.named_parameters() if not p.requires_grad)
    before = weight.detach().clone()

    def tamper(epoch: int) -> None:
        with torch.no_grad():
            weight.add_(1.0)

    # Execute / Assert
    try:
        with pytest.raises(RuntimeError, match="A frozen base-model parameter changed"):
            _train(model, tokenizer, dataset, on_epoch_end=tamper)
    finally:
        with torch.no_grad():
            weight.copy_(before)
    assert name and torch.equal(weight, before)


@pytest.mark.parametrize(
    ("peft_method", "lora_variant"),
    [("lora", "standard"), ("lora", "ffa"), ("prefix", "standard")],
    ids=["lora", "lora-ffa", "prefix"],
)
def test_dp_sgd_trains_each_peft_method_and_leaves_no_opacus_state_behind(
    tiny_base_model: Path,
    tokenizer: PreTrainedTokenizerBase,
    dataset: TextDataset,
    peft_method: str,
    lora_variant: str,
) -> None:
    from fedtune.common.dp_sgd import ExampleDP

    # Prepare
    cfg = FedConfig(peft_method=peft_method, lora_variant=lora_variant, seed=24)
    model = build_peft_model(PeftSpec.from_config(cfg, tiny_base_model, num_labels=2))
    before = get_adapter_arrays(model)
    dp = ExampleDP(
        noise_multiplier=1.0,
        clipping_norm=1.0,
        sampling_rate=0.5,
        expected_batch=4,
        round_steps=3,
        delta=1e-5,
        accountant="rdp",
    )

    # Execute (the frozen base is checked unchanged by train itself)
    result = _train(model, tokenizer, dataset, steps=3, seed=1, example_dp=dp)

    # Assert: exactly the steps asked for; every trainable tensor moved (noise at least); no hooks or
    # per-example gradients left on the model
    assert result.steps == 3
    assert all(not np.array_equal(a, b) for a, b in zip(before, get_adapter_arrays(model), strict=True))
    assert not any(getattr(p, "grad_sample", None) is not None for p in model.parameters())
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())
    with pytest.raises(ValueError, match="proximal term"):
        _train(model, tokenizer, dataset, steps=1, seed=1, example_dp=dp, proximal_mu=0.1)
