"""In-process PEFT arms (centralized and single-site) on the same model, loop and data as the sites."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from fedtune.common.run_folder import RunFolder

from .harness import console

if TYPE_CHECKING:
    from fedtune.common.config import FedConfig
    from fedtune.common.data import TextDataset
    from fedtune.common.local_plan import Schedule
    from fedtune.common.model import ModelParts  # heavy imports only where a benchmark trains in-process
    from fedtune.common.train import TrainResult


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``threads`` torch CPU threads (``None``: leave torch's setting)."""
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def bench_threads() -> int:
    """Torch CPU threads of the in-process arms: ``$FEDTUNE_BENCH_THREADS``, default 1.

    1 is what a simulated site gets (one Ray actor with ``num_cpus=1``); on a shared CPU more threads
    than free cores can make PyTorch many times slower, and these arms report quality, not time.
    """
    return int(os.environ.get("FEDTUNE_BENCH_THREADS", "1"))


def concat(parts: Sequence[TextDataset]) -> TextDataset:
    """One dataset holding every example of ``parts`` (same label names; answers too), in order."""
    return dataclasses.replace(
        parts[0],
        texts=tuple(t for p in parts for t in p.texts),
        labels=np.concatenate([p.labels for p in parts]),
        targets=tuple(t for p in parts for t in p.targets),
    )


def central_schedule(cfg: FedConfig, examples: int, epochs: int = 0, steps: int = 0) -> Schedule:
    """Centralized training's learning-rate schedule: the run config's, over all of its steps.

    The steps are ``steps`` when given, else ``epochs`` passes over ``examples``.
    """
    from fedtune.common.local_plan import Schedule

    total = steps or epochs * math.ceil(examples / cfg.batch_size)
    return Schedule(cfg.lr_schedule, total=total, warmup=round(cfg.lr_warmup * total))


def train_central(
    cfg: FedConfig,
    parts: ModelParts,
    train: TextDataset,
    *,
    epochs: int = 0,
    steps: int = 0,
    on_epoch_end: Callable[[int], None] | None = None,
) -> TrainResult:
    """Train ``parts.model`` on ``train`` in-process for ``epochs`` (or ``steps``) with a site's settings.

    Same optimiser, batch size, learning rate, max length, device and seed as a federated site; the
    learning-rate schedule runs over all the training and ``label-skew`` uses ``train``'s own label
    prior. Give exactly one of ``epochs`` and ``steps``.
    """
    from fedtune.common.train import recipe
    from fedtune.common.train import train as train_loop

    if (epochs > 0) == (steps > 0):
        raise ValueError(f"Give exactly one of epochs ({epochs}) and steps ({steps}).")
    with torch_threads(bench_threads()):
        return train_loop(
            parts.model,
            parts.tokenizer,
            train,
            epochs=epochs,
            steps=steps,
            device=parts.device,
            seed=cfg.seed,
            schedule=central_schedule(cfg, len(train), epochs, steps),
            on_epoch_end=on_epoch_end,
            **recipe(cfg, train),
        )


def _batched(cfg: FedConfig, parts: ModelParts, ds: TextDataset, fn: Callable[..., np.ndarray]) -> np.ndarray:
    """``fn(model, tokenizer, ds, ...)`` with the run config's batch size and length.

    Runs on :func:`bench_threads` torch threads, as the arms train.
    """
    with torch_threads(bench_threads()):
        return fn(
            parts.model,
            parts.tokenizer,
            ds,
            batch_size=cfg.batch_size,
            max_length=cfg.max_length,
            device=parts.device,
        )


def head_features(cfg: FedConfig, parts: ModelParts, ds: TextDataset) -> np.ndarray:
    """What ``parts.model``'s classifier head receives for each example of ``ds``, shape ``(n, d)``.

    :func:`fedtune.common.head_fit.head_inputs`, batched as :func:`predict`.
    """
    from fedtune.common.head_fit import head_inputs

    return _batched(cfg, parts, ds, head_inputs)


def predict(cfg: FedConfig, parts: ModelParts, ds: TextDataset) -> np.ndarray:
    """Class probabilities of ``parts.model`` on ``ds`` with the run config's batch size and length.

    Runs on :func:`bench_threads` torch threads, as the arms train.
    """
    from fedtune.common.train import predict_proba

    return _batched(cfg, parts, ds, predict_proba)


def train_and_score(
    cfg: FedConfig,
    train: TextDataset,
    test: TextDataset,
    *,
    epochs: int,
    keep_probs: bool = False,
    validation: TextDataset | None = None,
    curve_at: Sequence[int] = (),
) -> dict[str, Any]:
    """Train a fresh PEFT model of ``cfg`` on ``train`` with :func:`train_central`; score it on ``test``.

    ``keep_probs``: also return the final class probabilities on ``test`` as ``probs`` and, when
    ``validation`` is given, on ``validation`` as ``validation_probs`` (to choose settings without
    looking at ``test``).
    ``curve_at``: epochs after which the model is also scored on ``test`` (one run, the optimiser's
    state kept), returned as ``curve``: one ``{"epoch", "accuracy", "macro_f1"}`` per such epoch.
    """
    from fedtune.common.model import bring_up
    from fedtune.common.train import score

    parts = bring_up(cfg, len(train.label_names))
    num_labels = len(test.label_names)

    def probs() -> np.ndarray:
        return predict(cfg, parts, test)

    curve: list[dict[str, float]] = []

    def on_epoch_end(epoch: int) -> None:
        if epoch in curve_at:
            m = score(probs(), test.labels, num_labels).as_metrics()
            curve.append({"epoch": epoch, "accuracy": m["accuracy"], "macro_f1": m["macro_f1"]})

    res = train_central(cfg, parts, train, epochs=epochs, on_epoch_end=on_epoch_end if curve_at else None)
    final = probs()
    scored = score(final, test.labels, num_labels)
    console.print(
        f"[dim]in-process arm: {len(train)} examples x {epochs} epochs in {res.seconds:.0f} s, "
        f"held-out macro-F1 {scored.macro_f1:.3f}[/dim]"
    )
    out: dict[str, Any] = {
        **scored.as_metrics(),
        "train_examples": len(train),
        "examples_seen": res.examples,
        "train_seconds": res.seconds,
    }
    if curve_at:
        out["curve"] = curve
    if keep_probs:
        out["probs"] = final
        if validation is not None:
            out["validation_probs"] = predict(cfg, parts, validation)
    return out


def adapter_tensors(out: Path) -> dict[str, np.ndarray]:
    """The final shared adapter of a run (``OUT/adapter/adapter_model.safetensors``) as numpy arrays."""
    from safetensors.numpy import load_file

    return load_file(str(RunFolder(out).adapter_weights))


def shared_adapter_probs(cfg: FedConfig, out: Path, test: TextDataset) -> np.ndarray:
    """Class probabilities of a finished run's shared adapter on ``test`` (for a bootstrap CI)."""
    import torch
    from fedtune.common.model import bring_up
    from peft import set_peft_model_state_dict

    parts = bring_up(cfg, len(test.label_names))
    state = {k: torch.from_numpy(v) for k, v in adapter_tensors(out).items()}
    set_peft_model_state_dict(parts.model, state)
    return predict(cfg, parts, test)


def run_meta(out: Path) -> dict[str, Any]:
    """``OUT/adapter/fedtune.json``: adapter bytes, trainable share, base-model bytes, ..."""
    return json.loads(RunFolder(out).adapter_metadata.read_text())
