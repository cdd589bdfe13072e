"""Batches of a :class:`~fedtune.common.dataset.TextDataset` for training and scoring, and autocast.

A classification batch is ``(tokenized texts, class ids)``; a generative one is ``(prompt + answer
rows, token labels)`` (:func:`~fedtune.common.generative.encode_pairs`): the training loop tells
them apart by the labels' rank.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import nullcontext

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from .dataset import TextDataset
from .dp_sgd import ExampleDP, poisson_batches
from .generative import encode_pairs

Batch = tuple[dict[str, torch.Tensor], torch.Tensor]


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """Mixed-precision dtype for ``device``: bf16 (or fp16) on CUDA, none on CPU."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device):  # noqa: ANN201 - a context manager
    """Mixed precision on CUDA (:func:`autocast_dtype`); nothing on CPU."""
    dtype = autocast_dtype(device)
    return torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()


def batches(
    tokenizer: PreTrainedTokenizerBase,
    ds: TextDataset,
    batch_size: int,
    max_length: int,
    rng: np.random.Generator | None,
) -> Iterator[Batch]:
    """``ds`` cut into batches, in a ``rng`` permutation (``None``: in order)."""
    order = rng.permutation(len(ds)) if rng is not None else np.arange(len(ds))
    for start in range(0, len(ds), batch_size):
        yield encode(tokenizer, ds, order[start : start + batch_size], max_length)


def epochs(
    tokenizer: PreTrainedTokenizerBase, ds: TextDataset, batch_size: int, max_length: int, seed: int
) -> Iterator[Iterator[Batch]]:
    """An endless run of epochs, each a fresh seeded permutation of ``ds`` cut into batches."""
    rng = np.random.default_rng(seed)
    while True:
        yield batches(tokenizer, ds, batch_size, max_length, rng)


def poisson_epochs(
    tokenizer: PreTrainedTokenizerBase, ds: TextDataset, max_length: int, dp: ExampleDP
) -> Iterator[Iterator[Batch]]:
    """DP-SGD's batches: Poisson samples of ``ds`` (:func:`~fedtune.common.dp_sgd.poisson_batches`).

    An empty sample comes as ``({}, empty labels)``.
    """
    empty: Batch = ({}, torch.zeros(0, dtype=torch.long))
    for epoch in poisson_batches(len(ds), dp):
        yield (encode(tokenizer, ds, idx, max_length) if len(idx) else empty for idx in epoch)


def encode(tokenizer: PreTrainedTokenizerBase, ds: TextDataset, idx: np.ndarray, max_length: int) -> Batch:
    """The examples at ``idx`` as model inputs and labels (class ids, or a generative task's token labels)."""
    if ds.generative:
        return encode_pairs(tokenizer, [ds.texts[i] for i in idx], [ds.targets[i] for i in idx], max_length)
    texts = [ds.texts[i] for i in idx]
    inputs = tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    return dict(inputs), torch.as_tensor(ds.labels[idx], dtype=torch.long)
