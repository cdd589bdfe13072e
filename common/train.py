"""Local training and evaluation of a PEFT model (no Flower here).

A site picks CUDA when present (bf16 autocast where supported, else fp16 with a grad
scaler), otherwise CPU in float32. Only ``requires_grad`` parameters (adapter + head)
are given to the optimiser; :func:`train` checks that the frozen base did not change.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.metrics import f1_score, roc_auc_score
from transformers import PreTrainedTokenizerBase

from . import batching, generative
from .batching import autocast, autocast_dtype
from .config import FedConfig
from .dataset import TextDataset
from .dp_sgd import ExampleDP, empty_step, private, release
from .local_plan import LogitTransform, Schedule, skew_transform, steps_per_round
from .model import frozen_head, frozen_state_fingerprint


@dataclass(frozen=True)
class TrainResult:
    """What one local training call did."""

    loss: float  # mean cross-entropy over the examples seen (without the proximal term)
    examples: int  # examples processed
    steps: int  # optimiser steps taken
    seconds: float


@dataclass
class _Stepper:
    """How one optimiser step is taken: plain AdamW (mixed precision on CUDA), or DP-SGD through Opacus."""

    net: torch.nn.Module  # what the forward pass runs through
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    device: torch.device
    dp: ExampleDP | None

    @classmethod
    def build(
        cls,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
        dp: ExampleDP | None,
    ) -> _Stepper:
        """``optimizer`` on ``model`` as is, or wrapped by Opacus for ``dp``."""
        if dp is None:
            scaler = torch.amp.GradScaler(enabled=autocast_dtype(device) == torch.float16)
            return cls(model, optimizer, scaler, device, None)
        net, dp_optimizer = private(model, optimizer, dp)  # float32: no autocast under DP-SGD
        return cls(net, dp_optimizer, torch.amp.GradScaler(enabled=False), device, dp)

    def logits(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        with autocast(self.device) if self.dp is None else nullcontext():
            return self.net(**inputs).logits.float()

    def step(self, objective: torch.Tensor | None) -> None:
        """Back-propagate ``objective`` and step (``None``: DP-SGD's empty sample, noise only)."""
        self.optimizer.zero_grad(set_to_none=True)
        if objective is None:
            empty_step(self.optimizer)
            return
        self.scaler.scale(objective).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def close(self) -> None:
        """Leave the model as it came: Opacus' hooks and per-example gradients removed."""
        if self.dp is not None:
            self.optimizer.zero_grad(set_to_none=True)
            release(self.net)


def train(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    ds: TextDataset,
    *,
    epochs: int = 1,
    steps: int = 0,
    batch_size: int,
    learning_rate: float,
    weight_decay: float,
    max_length: int,
    device: torch.device,
    seed: int,
    proximal_mu: float = 0.0,
    schedule: Schedule | None = None,
    logit_transform: LogitTransform | None = None,
    example_dp: ExampleDP | None = None,
    on_epoch_end: Callable[[int], None] | None = None,
) -> TrainResult:
    """Train the trainable (PEFT + head) parameters of ``model`` on ``ds``.

    Parameters
    ----------
    epochs, steps
        Train for ``steps`` optimiser steps when positive (epoch after epoch, each reshuffled, the
        last one cut short), else for ``epochs`` whole epochs.
    proximal_mu
        FedProx weight: adds ``mu/2 * ||w - w_start||^2`` over the trainable parameters,
        ``w_start`` being their values when this call starts (the global adapter).
    schedule
        Learning-rate factor per step (``learning_rate`` is the peak); ``None`` = constant.
    logit_transform
        Label-skew correction applied to the logits in the training loss only.
    example_dp
        Patient-level DP-SGD (:mod:`fedtune.common.dp_sgd`): Poisson samples of expected size
        ``batch_size``, each example's gradient clipped and the sum noised, in float32; an epoch is
        ``ceil(1 / q)`` samples. ``None`` = plain training.
    on_epoch_end
        Called with the number of epochs done after each whole epoch (e.g. to score the model along
        the way, as a learning curve); it may move the model or switch it to eval mode: training goes
        on with the model back on ``device`` in train mode and the optimiser's state kept.

    Raises
    ------
    RuntimeError
        If any frozen base parameter changed, or the loss became non-finite.
    """
    if len(ds) == 0:
        raise ValueError("Cannot train on an empty dataset.")
    if example_dp is not None and proximal_mu > 0:
        raise ValueError("DP-SGD clips each example's gradient; a proximal term would escape it.")
    start = time.perf_counter()
    frozen_before = frozen_state_fingerprint(model)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    anchors = [p.detach().clone() for p in params] if proximal_mu > 0 else []
    stepper = _Stepper.build(
        model, torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay), device, example_dp
    )
    torch.manual_seed(seed)
    total_steps = steps if steps > 0 else epochs * math.ceil(len(ds) / batch_size)
    epochs_of = (
        batching.epochs(tokenizer, ds, batch_size, max_length, seed)
        if example_dp is None
        else batching.poisson_epochs(tokenizer, ds, max_length, example_dp)
    )
    total_loss, seen, step = 0.0, 0, 0
    for epoch, epoch_batches in enumerate(epochs_of, start=1):
        for inputs, labels in epoch_batches:
            if step == total_steps:
                break
            for group in stepper.optimizer.param_groups:
                group["lr"] = learning_rate * (schedule.factor(step) if schedule else 1.0)
            step += 1
            if not len(labels):
                stepper.step(None)
                continue
            loss = _loss(stepper, inputs, labels.to(device), device, logit_transform, causal=ds.generative)
            stepper.step(loss + _proximal(params, anchors, proximal_mu))
            total_loss += loss.item() * len(labels)
            seen += len(labels)
        else:  # a whole epoch
            if on_epoch_end is not None:
                on_epoch_end(epoch)
                model.to(device).train()
        if step == total_steps:
            break
    stepper.close()
    model.cpu()
    if frozen_state_fingerprint(model) != frozen_before:
        raise RuntimeError("A frozen base-model parameter changed during local training.")
    return TrainResult(
        loss=total_loss / max(seen, 1), examples=seen, steps=step, seconds=time.perf_counter() - start
    )


def _loss(
    stepper: _Stepper,
    inputs: dict[str, torch.Tensor],
    labels: torch.Tensor,
    device: torch.device,
    logit_transform: LogitTransform | None,
    *,
    causal: bool,
) -> torch.Tensor:
    """Cross-entropy of one batch; a non-finite one is refused.

    ``causal``: a causal LM's loss on the answer tokens (``labels`` are token labels ``(batch,
    length)``, :func:`generative.causal_loss`); else ``labels`` are class ids ``(batch,)`` and the
    loss is over the logits corrected by ``logit_transform``.
    """
    logits = stepper.logits({k: v.to(device) for k, v in inputs.items()})
    if causal:
        loss = generative.causal_loss(logits, labels)
    else:
        logits = logit_transform(logits) if logit_transform is not None else logits
        loss = torch.nn.functional.cross_entropy(logits, labels)
    if not torch.isfinite(loss):
        raise RuntimeError(f"Training loss became {loss.item()}; lower `learning-rate`.")
    return loss


def _proximal(params: list[torch.Tensor], anchors: list[torch.Tensor], mu: float) -> torch.Tensor | float:
    """FedProx's ``mu/2 * ||w - w_start||^2`` (0 without anchors)."""
    if not anchors:
        return 0.0
    return mu / 2 * sum(((p - a) ** 2).sum() for p, a in zip(params, anchors, strict=True))


def train_local(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    ds: TextDataset,
    cfg: FedConfig,
    *,
    device: torch.device,
    seed: int,
    server_round: int,
    proximal_mu: float = 0.0,
    example_dp: ExampleDP | None = None,
) -> TrainResult:
    """One site's local training at ``server_round``: the run config's steps, schedule and skew correction.

    The site takes :func:`~fedtune.common.local_plan.steps_per_round` steps; the learning rate follows
    the run-wide schedule from where the previous round stopped; the training logits are corrected
    with this site's own label counts (``label-skew``); with ``local-head=frozen`` the classifier head
    stays as it came (only the adapter trains); ``example_dp``: with DP-SGD.
    """
    round_steps = steps_per_round(len(ds), cfg)
    with frozen_head(model, cfg.local_head == "frozen"):
        return train(
            model,
            tokenizer,
            ds,
            steps=round_steps,
            device=device,
            seed=seed,
            proximal_mu=proximal_mu,
            schedule=Schedule.for_round(cfg, server_round, round_steps),
            example_dp=example_dp,
            **recipe(cfg, ds),
        )


def recipe(cfg: FedConfig, ds: TextDataset) -> dict[str, Any]:
    """The :func:`train` settings a run config fixes for training on ``ds``.

    Batch size, learning rate, weight decay, max length, and the ``label-skew`` correction from
    ``ds``'s own label counts; shared by a site and the benchmarks' in-process arms.
    """
    return {
        "batch_size": cfg.batch_size,
        "learning_rate": cfg.learning_rate,
        "weight_decay": cfg.weight_decay,
        "max_length": cfg.max_length,
        "logit_transform": skew_transform(cfg, ds.labels, len(ds.label_names)),
    }


@dataclass(frozen=True)
class EvalResult:
    """Scores of a model on one dataset."""

    loss: float
    accuracy: float
    macro_f1: float
    auc: float | None  # ROC AUC, binary tasks only
    examples: int

    def as_metrics(self) -> dict[str, float]:
        """Flat metric dict (``auc`` only when defined)."""
        out = {"loss": self.loss, "accuracy": self.accuracy, "macro_f1": self.macro_f1}
        if self.auc is not None:
            out["auc"] = self.auc
        return out


def _eval_logits(
    model: torch.nn.Module, inputs: dict[str, torch.Tensor], device: torch.device
) -> torch.Tensor:
    """The model's logits for one batch, under the device's autocast (callers hold ``no_grad``)."""
    with autocast(device):
        return model(**{k: v.to(device) for k, v in inputs.items()}).logits


@torch.no_grad()
def predict_proba(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    ds: TextDataset,
    *,
    batch_size: int,
    max_length: int,
    device: torch.device,
) -> np.ndarray:
    """Class probabilities, shape ``(len(ds), num_labels)``."""
    model.to(device).eval()
    out = []
    for inputs, _ in batching.batches(tokenizer, ds, batch_size, max_length, None):
        logits = _eval_logits(model, inputs, device)
        out.append(torch.softmax(logits.float(), dim=-1).cpu().numpy())
    model.cpu()
    return np.concatenate(out) if out else np.zeros((0, len(ds.label_names)), dtype=np.float32)


@torch.no_grad()
def example_losses(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    ds: TextDataset,
    *,
    batch_size: int,
    max_length: int,
    device: torch.device,
) -> np.ndarray:
    """Each example's loss, shape ``(len(ds),)``.

    Classification: ``-log p(its class)``. A generative task: the mean cross-entropy on its answer
    tokens (0 for an answer cut off entirely by ``max_length``).
    """
    if not ds.generative:
        probs = predict_proba(
            model, tokenizer, ds, batch_size=batch_size, max_length=max_length, device=device
        )
        return -np.log(np.clip(probs[np.arange(len(probs)), ds.labels], 1e-12, None))
    model.to(device).eval()
    out = []
    for start in range(0, len(ds), batch_size):
        idx = np.arange(start, min(start + batch_size, len(ds)))
        inputs, labels = batching.encode(tokenizer, ds, idx, max_length)
        losses, _ = generative.answer_losses(_eval_logits(model, inputs, device), labels.to(device))
        out.append(losses.cpu().numpy())
    model.cpu()
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


def score(probs: np.ndarray, labels: np.ndarray, num_labels: int) -> EvalResult:
    """Loss, accuracy, macro-F1 (over the labels present in truth or prediction) and binary AUC."""
    if len(labels) == 0:
        raise ValueError("Cannot score an empty dataset.")
    pred = probs.argmax(axis=1)
    loss = float(-np.mean(np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None))))
    auc = None
    if num_labels == 2 and len(np.unique(labels)) == 2:
        auc = float(roc_auc_score(labels, probs[:, 1]))
    return EvalResult(
        loss=loss,
        accuracy=float((pred == labels).mean()),
        macro_f1=float(f1_score(labels, pred, average="macro", zero_division=0)),
        auc=auc,
        examples=len(labels),
    )


def evaluate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    ds: TextDataset,
    *,
    batch_size: int,
    max_length: int,
    device: torch.device,
    max_new_tokens: int = 16,
) -> EvalResult | generative.GenerationResult:
    """Score ``model`` on ``ds``: classification scores, or a generative task's generated answers.

    ``max_new_tokens`` bounds each generated answer.
    """
    if ds.generative:
        return _evaluate_answers(model, tokenizer, ds, batch_size, max_length, device, max_new_tokens)
    probs = predict_proba(model, tokenizer, ds, batch_size=batch_size, max_length=max_length, device=device)
    result = score(probs, ds.labels, len(ds.label_names))
    assert math.isfinite(result.loss)
    return result


@torch.no_grad()
def _evaluate_answers(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    ds: TextDataset,
    batch_size: int,
    max_length: int,
    device: torch.device,
    max_new_tokens: int,
) -> generative.GenerationResult:
    """A generative task's teacher-forced loss and greedily generated answers, scored."""
    if len(ds) == 0:
        raise ValueError("Cannot score an empty dataset.")
    model.to(device).eval()
    loss_sum, answers = 0.0, []
    for start in range(0, len(ds), batch_size):
        idx = np.arange(start, min(start + batch_size, len(ds)))
        inputs, labels = batching.encode(tokenizer, ds, idx, max_length)
        logits = _eval_logits(model, inputs, device)
        loss_sum += generative.causal_loss(logits, labels.to(device)).item() * len(idx)
        with autocast(device):
            answers += generative.generate(
                model,
                tokenizer,
                [ds.texts[i] for i in idx],
                max_new_tokens=max_new_tokens,
                max_length=max_length,
                device=device,
            )
    model.cpu()
    return generative.result(loss_sum / len(ds), answers, ds)
