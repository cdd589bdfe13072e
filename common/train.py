"""Local training and evaluation of a PEFT model (no Flower here).

A site picks CUDA when present (bf16 autocast where supported, else fp16 with a grad
scaler), otherwise CPU in float32. Only ``requires_grad`` parameters (adapter + head)
are given to the optimiser; :func:`train` checks that the frozen base did not change.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.metrics import f1_score, roc_auc_score
from transformers import PreTrainedTokenizerBase

from .config import FedConfig
from .data import TextDataset
from .model import frozen_state_fingerprint


def select_device(preference: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available else CPU; ``cuda`` without a GPU is an error."""
    if preference == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("`device=cuda` but no CUDA GPU is visible; use `device=auto` or `device=cpu`.")
    if preference in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """Mixed-precision dtype for ``device``: bf16 (or fp16) on CUDA, none on CPU."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _autocast(device: torch.device):  # noqa: ANN202 - a context manager
    dtype = autocast_dtype(device)
    return torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()


def _batches(
    tokenizer: PreTrainedTokenizerBase,
    ds: TextDataset,
    batch_size: int,
    max_length: int,
    rng: np.random.Generator | None,
) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    order = rng.permutation(len(ds)) if rng is not None else np.arange(len(ds))
    for start in range(0, len(ds), batch_size):
        idx = order[start : start + batch_size]
        enc = tokenizer(
            [ds.texts[i] for i in idx],
            truncation=True,
            max_length=max_length,
            padding=True,
            return_tensors="pt",
        )
        yield dict(enc), torch.as_tensor(ds.labels[idx], dtype=torch.long)


@dataclass(frozen=True)
class TrainResult:
    """What one local training call did."""

    loss: float  # mean cross-entropy over the examples seen (without the proximal term)
    examples: int  # examples processed (epochs x dataset size)
    seconds: float


def train(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    ds: TextDataset,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    weight_decay: float,
    max_length: int,
    device: torch.device,
    seed: int,
    proximal_mu: float = 0.0,
    on_epoch_end: Callable[[int], None] | None = None,
) -> TrainResult:
    """Train the trainable (PEFT + head) parameters of ``model`` on ``ds``.

    Parameters
    ----------
    proximal_mu
        FedProx weight: adds ``mu/2 * ||w - w_start||^2`` over the trainable parameters,
        ``w_start`` being their values when this call starts (the global adapter).
    on_epoch_end
        Called with the number of epochs done after each epoch (e.g. to score the model along the
        way, as a learning curve); it may move the model or switch it to eval mode: training goes on
        with the model back on ``device`` in train mode and the optimiser's state kept.

    Raises
    ------
    RuntimeError
        If any frozen base parameter changed, or the loss became non-finite.
    """
    if len(ds) == 0:
        raise ValueError("Cannot train on an empty dataset.")
    start = time.perf_counter()
    frozen_before = frozen_state_fingerprint(model)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    anchors = [p.detach().clone() for p in params] if proximal_mu > 0 else []
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)
    scaler = torch.amp.GradScaler(enabled=autocast_dtype(device) == torch.float16)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    total_loss, seen = 0.0, 0
    for epoch in range(1, epochs + 1):
        for inputs, labels in _batches(tokenizer, ds, batch_size, max_length, rng):
            inputs, labels = {k: v.to(device) for k, v in inputs.items()}, labels.to(device)
            with _autocast(device):
                logits = model(**inputs).logits  # (batch, num_labels)
                loss = torch.nn.functional.cross_entropy(logits.float(), labels)
            if not torch.isfinite(loss):
                raise RuntimeError(f"Training loss became {loss.item()}; lower `learning-rate`.")
            objective = loss
            if anchors:
                objective = loss + proximal_mu / 2 * sum(
                    ((p - a) ** 2).sum() for p, a in zip(params, anchors, strict=True)
                )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(objective).backward()
            scaler.step(optimizer)
            scaler.update()
            total_loss += loss.item() * len(labels)
            seen += len(labels)
        if on_epoch_end is not None:
            on_epoch_end(epoch)
            model.to(device).train()
    model.cpu()
    if frozen_state_fingerprint(model) != frozen_before:
        raise RuntimeError("A frozen base-model parameter changed during local training.")
    return TrainResult(loss=total_loss / seen, examples=seen, seconds=time.perf_counter() - start)


def train_local(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    ds: TextDataset,
    cfg: FedConfig,
    *,
    device: torch.device,
    seed: int,
    proximal_mu: float = 0.0,
) -> TrainResult:
    """One site's local training with the run config's epochs, batch, optimiser and length settings."""
    return train(
        model,
        tokenizer,
        ds,
        epochs=cfg.local_epochs,
        batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        max_length=cfg.max_length,
        device=device,
        seed=seed,
        proximal_mu=proximal_mu,
    )


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
    for inputs, _ in _batches(tokenizer, ds, batch_size, max_length, None):
        with _autocast(device):
            logits = model(**{k: v.to(device) for k, v in inputs.items()}).logits
        out.append(torch.softmax(logits.float(), dim=-1).cpu().numpy())
    model.cpu()
    return np.concatenate(out) if out else np.zeros((0, len(ds.label_names)), dtype=np.float32)


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
) -> EvalResult:
    """Score ``model`` on ``ds``."""
    probs = predict_proba(model, tokenizer, ds, batch_size=batch_size, max_length=max_length, device=device)
    result = score(probs, ds.labels, len(ds.label_names))
    assert math.isfinite(result.loss)
    return result
