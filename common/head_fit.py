"""A classifier head solved in closed form (LDA) from feature statistics that sum over sites.

Under label skew the encoder that FedAvg trains is good, and its shared head is what fails: each
site trains the head rows of the few classes it holds, and averaging dilutes them. A head that is
solved instead of trained sees every class at once. Linear discriminant analysis needs only two
means over the training examples, with ``x~ = (x, 1)`` the input of the classifier head followed
by a constant and ``y`` the one-hot label:

- ``second_moment`` = mean of ``x~ x~^T``, shape ``(d + 1, d + 1)``;
- ``cross_moment`` = mean of ``x~ y^T``, shape ``(d + 1, C)``; its last row is the class shares.

The example-weighted average of the sites' means is the pooled mean, which is what secure
aggregation computes: a head solved from it is exactly the head the pooled data would give.
:func:`solve_lda` gives every class the same prior (a balanced classifier, what macro-F1 scores)
and shrinks the within-class covariance towards a multiple of the identity (``shrinkage``, as
scikit-learn's ``LinearDiscriminantAnalysis``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from peft.utils import ModulesToSaveWrapper
from transformers import PreTrainedTokenizerBase

from . import batching
from .data import TextDataset

ABSENT_MARGIN = 100.0  # a class without training examples scores this far below the lowest other


@dataclass(frozen=True)
class HeadStatistics:
    """Means over a set of examples of ``x~ x~^T`` and ``x~ y^T`` (see the module docstring).

    Attributes
    ----------
    second_moment
        ``(d + 1, d + 1)``: mean of ``x~ x~^T``.
    cross_moment
        ``(d + 1, C)``: mean of ``x~ y^T``; the last row holds the class shares.
    examples
        How many examples the means are over (a site's weight in the pooled mean).
    """

    second_moment: np.ndarray
    cross_moment: np.ndarray
    examples: int

    @classmethod
    def of(cls, features: np.ndarray, labels: np.ndarray, num_labels: int) -> HeadStatistics:
        """The statistics of ``features`` ``(n, d)`` with integer ``labels`` ``(n,)``."""
        if len(features) == 0:
            raise ValueError("HeadStatistics: no examples to compute head statistics from.")
        x = np.hstack([features, np.ones((len(features), 1))]).astype(np.float64)
        y = np.eye(num_labels)[labels]
        n = len(features)
        return cls(second_moment=x.T @ x / n, cross_moment=x.T @ y / n, examples=n)

    @staticmethod
    def pooled(sites: Sequence[HeadStatistics]) -> HeadStatistics:
        """The example-weighted mean of ``sites``' statistics: those of their examples taken together."""
        total = sum(s.examples for s in sites)
        if total == 0:
            raise ValueError("HeadStatistics.pooled: the sites hold no examples.")
        return HeadStatistics(
            second_moment=sum(s.examples * s.second_moment for s in sites) / total,
            cross_moment=sum(s.examples * s.cross_moment for s in sites) / total,
            examples=total,
        )


def solve_lda(stats: HeadStatistics, shrinkage: float) -> tuple[np.ndarray, np.ndarray]:
    """The LDA head ``(weight (C, d), bias (C,))`` of ``stats``, every class at the same prior.

    Class ``k``'s score is ``mu_k^T S^-1 x - mu_k^T S^-1 mu_k / 2``, with ``mu_k`` its mean feature
    and ``S`` the within-class covariance shrunk by ``shrinkage`` in [0, 1]:
    ``(1 - shrinkage) S + shrinkage trace(S) / d I``. A class without examples is never predicted
    (weight 0, bias :data:`ABSENT_MARGIN` below the lowest other).
    """
    if not 0.0 <= shrinkage <= 1.0:
        raise ValueError(f"solve_lda: shrinkage must be in [0, 1], got {shrinkage}.")
    d = stats.second_moment.shape[0] - 1
    shares = stats.cross_moment[d]
    present = shares > 0
    if not present.any():
        raise ValueError("solve_lda: the statistics hold no labelled examples.")
    means = stats.cross_moment[:d, present] / shares[present]  # (d, classes present)
    within = stats.second_moment[:d, :d] - (means * shares[present]) @ means.T
    shrunk = (1.0 - shrinkage) * within + shrinkage * np.trace(within) / d * np.eye(d)
    coef = np.linalg.lstsq(shrunk, means, rcond=None)[0]  # S^-1 mu_k, column by column
    weight = np.zeros((len(shares), d))
    bias = np.zeros(len(shares))
    weight[present] = coef.T
    bias[present] = -0.5 * np.einsum("dk,dk->k", means, coef)
    bias[~present] = bias[present].min() - ABSENT_MARGIN
    return weight, bias


def head_layer(model: torch.nn.Module) -> torch.nn.Linear:
    """The trainable classifier head of a PEFT sequence classifier (peft's ``modules_to_save`` copy)."""
    heads = [
        m.modules_to_save[m.active_adapter] for m in model.modules() if isinstance(m, ModulesToSaveWrapper)
    ]
    linear = [h for h in heads if isinstance(h, torch.nn.Linear)]
    if len(linear) != 1:
        raise ValueError(
            f"head_layer: expected one trainable linear classifier head, found {len(linear)}; a head "
            "is solved only for a sequence-classification task."
        )
    return linear[0]


@torch.no_grad()
def head_inputs(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    ds: TextDataset,
    *,
    batch_size: int,
    max_length: int,
    device: torch.device,
) -> np.ndarray:
    """What the classifier head receives for each example of ``ds`` (eval mode), shape ``(n, d)``."""
    head, seen = head_layer(model), []
    hook = head.register_forward_hook(lambda _m, args, _out: seen.append(args[0].float().cpu()))
    try:
        model.to(device).eval()
        for inputs, _ in batching.batches(tokenizer, ds, batch_size, max_length, None):
            model(**{k: v.to(device) for k, v in inputs.items()})
    finally:
        hook.remove()
        model.cpu()
    return torch.cat(seen).numpy() if seen else np.zeros((0, head.in_features), dtype=np.float32)


def set_head(model: torch.nn.Module, weight: np.ndarray, bias: np.ndarray) -> None:
    """Write ``weight`` ``(C, d)`` and ``bias`` ``(C,)`` into the model's classifier head."""
    head = head_layer(model)
    if weight.shape != tuple(head.weight.shape) or bias.shape != (head.out_features,):
        raise ValueError(
            f"set_head: got weight {weight.shape} and bias {bias.shape}, the head has "
            f"{tuple(head.weight.shape)} and ({head.out_features},)."
        )
    with torch.no_grad():
        head.weight.copy_(torch.as_tensor(weight, dtype=head.weight.dtype))
        head.bias.copy_(torch.as_tensor(bias, dtype=head.bias.dtype))
