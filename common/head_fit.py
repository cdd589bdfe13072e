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
from transformers import PreTrainedTokenizerBase

from .data import TextDataset
from .model import head_layer
from .train import predict_proba
from .updates import moments_defect, statistics_defect

ABSENT_MARGIN = 100.0  # without a limit, the constant score of a class without training examples


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

    def arrays(self, dtype: type[np.floating] = np.float32) -> list[np.ndarray]:
        """The statistics as they travel: ``[second_moment's upper triangle, cross_moment]``.

        ``second_moment`` is symmetric, so only its upper triangle (row by row, the diagonal
        included: ``k (k + 1) / 2`` values) is sent, about half the values of the full matrix.
        """
        upper = self.second_moment[np.triu_indices(len(self.second_moment))]
        return [upper.astype(dtype), self.cross_moment.astype(dtype)]

    @classmethod
    def from_arrays(cls, arrays: Sequence[np.ndarray], examples: int) -> HeadStatistics:
        """Statistics from their travelling form (:meth:`arrays`), over ``examples`` examples."""
        defect = statistics_defect(arrays)
        if defect:
            raise ValueError(f"HeadStatistics: {defect}.")
        upper, cross = (np.asarray(a, dtype=np.float64) for a in arrays)
        rows, cols = np.triu_indices(cross.shape[0])
        second = np.zeros((cross.shape[0], cross.shape[0]))
        second[rows, cols] = upper
        second[cols, rows] = upper
        return cls(second_moment=second, cross_moment=cross, examples=examples)

    @staticmethod
    def pooled(sites: Sequence[HeadStatistics]) -> HeadStatistics:
        """The example-weighted mean of ``sites``' statistics: those of their examples taken together."""
        total = sum(s.examples for s in sites)
        if total == 0:
            raise ValueError("HeadStatistics.pooled: the sites hold no examples.")
        return HeadStatistics(
            second_moment=np.sum([s.examples * s.second_moment for s in sites], axis=0) / total,
            cross_moment=np.sum([s.examples * s.cross_moment for s in sites], axis=0) / total,
            examples=total,
        )


@dataclass(frozen=True)
class FeatureMoments:
    """Means over a set of examples of each feature and of its square: where the features lie.

    Under SecAgg+ the sites send these first, so the coordinator can centre and scale the
    statistics they send next (:class:`StatisticsFrame`): ``2 d`` values, not the statistics' own.

    Attributes
    ----------
    mean
        ``(d,)``: mean of ``x``.
    mean_square
        ``(d,)``: mean of ``x ** 2``, feature by feature.
    examples
        How many examples the means are over.
    """

    mean: np.ndarray
    mean_square: np.ndarray
    examples: int

    @classmethod
    def of(cls, features: np.ndarray) -> FeatureMoments:
        """The moments of ``features`` ``(n, d)``."""
        if len(features) == 0:
            raise ValueError("FeatureMoments: no examples to compute feature moments from.")
        x = features.astype(np.float64)
        return cls(mean=x.mean(axis=0), mean_square=(x**2).mean(axis=0), examples=len(x))

    def arrays(self, dtype: type[np.floating] = np.float32) -> list[np.ndarray]:
        """The moments as they travel: ``[mean, mean_square]``."""
        return [self.mean.astype(dtype), self.mean_square.astype(dtype)]

    @classmethod
    def from_arrays(cls, arrays: Sequence[np.ndarray], examples: int) -> FeatureMoments:
        """Moments from their travelling form (:meth:`arrays`), over ``examples`` examples."""
        defect = moments_defect(arrays)
        if defect:
            raise ValueError(f"FeatureMoments: {defect}.")
        mean, square = (np.asarray(a, dtype=np.float64) for a in arrays)
        return cls(mean=mean, mean_square=square, examples=examples)


@dataclass(frozen=True)
class StatisticsFrame:
    """The coordinates a site's features are summarised in: ``z = (x - centre) / scale``, feature by feature.

    SecAgg+ quantises every value it sums with one step over ``+-clipping range``. The statistics of
    the features themselves waste it: their ``x x^T`` block is dominated by the features' mean, and a
    trained encoder's features vary little about it (on Pima diabetes most covariance eigenvalues lie
    far below the step), so the quantisation noise swamps the covariance and the solved head. In a
    frame that centres each feature on the pooled mean and scales its variance to a known spread
    (from the sites' :class:`FeatureMoments`), every value is resolved to a small fraction of its
    spread, and the coordinator maps the pooled statistics back to ``x`` exactly (:meth:`undo`): an
    affine change of coordinates is linear in the sums.

    Attributes
    ----------
    centre
        ``(d,)``: subtracted from each feature.
    scale
        ``(d,)``: each centred feature is divided by it (positive).
    """

    centre: np.ndarray
    scale: np.ndarray

    def __post_init__(self) -> None:
        if self.centre.shape != self.scale.shape or self.centre.ndim != 1:
            raise ValueError(
                f"StatisticsFrame: centre {self.centre.shape} and scale {self.scale.shape} must be the "
                "same 1-d shape."
            )
        finite = np.all(np.isfinite(self.centre)) and np.all(np.isfinite(self.scale))
        if not (finite and np.all(self.scale > 0)):
            raise ValueError("StatisticsFrame: centre must be finite and scale finite and positive.")

    @classmethod
    def of(cls, moments: FeatureMoments, *, spread: float, floor: float) -> StatisticsFrame:
        """The frame that centres the features of ``moments`` and gives each the variance ``spread``.

        A variance below ``floor`` (what the moments cannot tell from 0) counts as ``floor``.
        """
        variance = np.maximum(moments.mean_square - moments.mean**2, floor)
        return cls(centre=moments.mean.copy(), scale=np.sqrt(variance / spread))

    def to_bytes(self) -> bytes:
        """The frame as it travels in a message's config: ``centre`` then ``scale``, float64."""
        return np.concatenate([self.centre, self.scale]).astype("<f8").tobytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> StatisticsFrame:
        """A frame from :meth:`to_bytes`."""
        values = np.frombuffer(data, dtype="<f8")
        if len(values) == 0 or len(values) % 2:
            raise ValueError(f"StatisticsFrame: {len(data)} bytes are not a centre and a scale of float64.")
        centre, scale = np.split(values.astype(np.float64), 2)
        return cls(centre=centre, scale=scale)

    def apply(self, features: np.ndarray) -> np.ndarray:
        """``features`` ``(n, d)`` in this frame."""
        if features.shape[1:] != self.centre.shape:
            raise ValueError(
                f"StatisticsFrame: the frame is for {len(self.centre)} features, the head receives "
                f"{features.shape[1:]}: the coordinator's model differs from this site's."
            )
        return (features.astype(np.float64) - self.centre) / self.scale

    def undo(self, stats: HeadStatistics) -> HeadStatistics:
        """``stats`` of features in this frame, mapped back to the features themselves.

        With ``x~ = A z~``, ``A = [[diag(scale), centre], [0, 1]]``: ``x~ x~^T = A z~ z~^T A^T`` and
        ``x~ y^T = A z~ y^T``, and so for their means. The mean of ``z~`` (the last row and column of
        ``z~ z~^T``) is taken from the cross moment, where it also lies (every example has one label:
        ``z~ = sum_k z~ y_k``): the two copies SecAgg+ quantised apart would not cancel where the
        centre is brought back, and the covariance, far smaller than ``centre centre^T``, would drown.
        """
        d = len(self.centre)
        a = np.eye(d + 1)
        a[:d, :d] = np.diag(self.scale)
        a[:d, d] = self.centre
        moment = stats.second_moment.copy()
        moment[:, d] = moment[d, :] = stats.cross_moment.sum(axis=1)
        second = a @ moment @ a.T
        return HeadStatistics((second + second.T) / 2, a @ stats.cross_moment, stats.examples)


def site_moments(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    ds: TextDataset,
    *,
    batch_size: int,
    max_length: int,
    device: torch.device,
) -> FeatureMoments:
    """A site's feature moments: its training examples through the shared adapter it received."""
    return FeatureMoments.of(
        head_inputs(model, tokenizer, ds, batch_size=batch_size, max_length=max_length, device=device)
    )


def site_statistics(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    ds: TextDataset,
    *,
    batch_size: int,
    max_length: int,
    device: torch.device,
    frame: StatisticsFrame | None = None,
) -> HeadStatistics:
    """A site's statistics: its training examples through the shared adapter it received.

    ``frame``: the coordinates the features are summarised in (under SecAgg+), else the features.
    """
    features = head_inputs(model, tokenizer, ds, batch_size=batch_size, max_length=max_length, device=device)
    if frame is not None:
        features = frame.apply(features)
    return HeadStatistics.of(features, ds.labels, len(ds.label_names))


def solve_lda(
    stats: HeadStatistics, shrinkage: float, limit: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The LDA head ``(weight (C, d), bias (C,))`` of ``stats``, every class at the same prior.

    Class ``k``'s score is ``mu_k^T S^-1 x - mu_k^T S^-1 mu_k / 2``, with ``mu_k`` its mean feature
    and ``S`` the within-class covariance shrunk by ``shrinkage`` in [0, 1]:
    ``(1 - shrinkage) S + shrinkage trace(S) / d I``; the scores are centred over the classes
    (the same vector and constant taken from every class: the same class wins), so the winning
    score is never negative. ``limit`` scales the head down (every score by the same factor) until
    no value exceeds it in magnitude: what SecAgg+ can carry when the sites train and send the head
    again. A class without examples is never predicted: weight 0, bias ``-limit`` (without a limit,
    ``-``:data:`ABSENT_MARGIN`).
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
    # centred over the classes present: every example's mean score is 0, the winner's at least 0
    scores_w, scores_b = coef.T, -0.5 * np.einsum("dk,dk->k", means, coef)
    weight[present] = scores_w - scores_w.mean(axis=0)
    bias[present] = scores_b - scores_b.mean()
    if limit is not None:
        largest = max(np.abs(weight).max(), np.abs(bias).max())
        scale = min(1.0, limit / largest) if largest > 0 else 1.0
        weight, bias = weight * scale, bias * scale
    bias[~present] = -(limit if limit is not None else ABSENT_MARGIN)
    return weight, bias


def statistics_shapes(model: torch.nn.Module) -> list[list[int]]:
    """The shapes of the statistics a site sends for ``model``'s head (:meth:`HeadStatistics.arrays`).

    ``[[k (k + 1) / 2], [k, C]]`` with ``k = d + 1``.
    """
    head = head_layer(model)
    k = head.in_features + 1
    return [[k * (k + 1) // 2], [k, head.out_features]]


def moments_shapes(model: torch.nn.Module) -> list[list[int]]:
    """The shapes of the feature moments a site sends for ``model``'s head: ``[[d], [d]]``."""
    d = head_layer(model).in_features
    return [[d], [d]]


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
    """What the classifier head receives for each example of ``ds`` (eval mode), shape ``(n, d)``.

    Captured by a hook on the head while :func:`~fedtune.common.train.predict_proba` scores ``ds``
    (the same batches and autocast as the scoring).
    """
    head, seen = head_layer(model), []
    hook = head.register_forward_hook(lambda _m, args, _out: seen.append(args[0].float().cpu()))
    try:
        predict_proba(model, tokenizer, ds, batch_size=batch_size, max_length=max_length, device=device)
    finally:
        hook.remove()
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
