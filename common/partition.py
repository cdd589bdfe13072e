"""Split a label array into simulated sites (partitions), like flwr-datasets' partitioners.

Each partitioner computes every partition once, in ``__init__``, from the label array alone and a seed
(:func:`numpy.random.default_rng`), so the same inputs always give the same sites. Partitions are
disjoint, cover every index exactly once and are never empty; :meth:`Partitioner.load_partition`
returns a site's sorted indices into the label array.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from . import options

_FILL_PASSES = 4  # SpecialtyPartitioner step 4


class Partitioner(ABC):
    """Disjoint, covering, non-empty partitions of ``range(len(labels))``.

    Parameters
    ----------
    labels
        Integer class id of each example (1-D).
    num_partitions
        Number of sites; at most ``len(labels)``.
    seed
        Seed of :func:`numpy.random.default_rng`.
    """

    def __init__(self, labels: np.ndarray, num_partitions: int, seed: int) -> None:
        labels = np.asarray(labels)
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(
                f"labels must be a 1-D integer array, got shape {labels.shape} and {labels.dtype}."
            )
        if num_partitions < 1:
            raise ValueError(f"num_partitions must be >= 1, got {num_partitions}.")
        if num_partitions > len(labels):
            raise ValueError(
                f"num_partitions={num_partitions} exceeds the {len(labels)} examples, so some site would be "
                f"empty; use at most {len(labels)} partitions or more data (e.g. raise `max-examples`)."
            )
        owner = self._assign(labels, num_partitions, np.random.default_rng(seed))
        order = np.argsort(owner, kind="stable").astype(np.int64)
        sizes = np.bincount(owner, minlength=num_partitions)
        self._partitions = tuple(np.split(order, np.cumsum(sizes)[:-1]))
        for part in self._partitions:
            part.setflags(write=False)

    @abstractmethod
    def _assign(self, labels: np.ndarray, num_partitions: int, rng: np.random.Generator) -> np.ndarray:
        """Return the partition id of every example (int array of ``len(labels)``; every id used)."""

    @property
    def num_partitions(self) -> int:
        """Number of partitions (sites)."""
        return len(self._partitions)

    def load_partition(self, partition_id: int) -> np.ndarray:
        """Return the sorted int64 indices (read-only) of partition ``partition_id``.

        Raises
        ------
        ValueError
            If ``partition_id`` is not in ``0 .. num_partitions - 1``.
        """
        if not 0 <= partition_id < self.num_partitions:
            raise ValueError(
                f"partition_id={partition_id} is out of range; valid ids are 0..{self.num_partitions - 1} "
                f"(num_partitions={self.num_partitions})."
            )
        return self._partitions[partition_id]


class IidPartitioner(Partitioner):
    """Uniform random split into near-equal partitions (sizes differ by at most one).

    Examples
    --------
    >>> p = IidPartitioner(np.zeros(7, dtype=int), num_partitions=3, seed=0)
    >>> [len(p.load_partition(i)) for i in range(3)]
    [3, 2, 2]
    """

    def _assign(self, labels: np.ndarray, num_partitions: int, rng: np.random.Generator) -> np.ndarray:
        owner = np.empty(len(labels), dtype=np.int64)
        owner[rng.permutation(len(labels))] = np.arange(len(labels)) * num_partitions // len(labels)
        return owner


class DirichletPartitioner(Partitioner):
    """Label-skewed split: each label's examples spread over sites by Dirichlet proportions.

    For every label, proportions ``p ~ Dir(alpha, ..., alpha)`` over the partitions are drawn and that
    label's shuffled examples are cut at ``floor(cumsum(p) * count)`` (Hsu, Qi and Brown 2019, "Measuring
    the Effects of Non-Identical Data Distribution for Federated Visual Classification",
    arXiv:1909.06335). Small ``alpha`` gives sites few dominant labels; large ``alpha`` approaches IID.
    The whole draw is repeated until every partition has at least ``min_partition_size`` examples.

    Parameters
    ----------
    labels, num_partitions, seed
        As in :class:`Partitioner`.
    alpha
        Dirichlet concentration (> 0).
    min_partition_size
        Smallest acceptable partition (>= 1).
    max_tries
        Draws before giving up.

    Raises
    ------
    ValueError
        If no draw in ``max_tries`` gives every partition ``min_partition_size`` examples.

    Examples
    --------
    Per-site label counts of 30 examples (3 labels x 10) over 3 sites, skewed and near IID:

    >>> labels = np.repeat(np.arange(3), 10)
    >>> for alpha in (0.1, 100.0):
    ...     p = DirichletPartitioner(labels, num_partitions=3, alpha=alpha, seed=0)
    ...     print([np.bincount(labels[p.load_partition(i)], minlength=3).tolist() for i in range(3)])
    [[5, 0, 0], [2, 9, 0], [3, 1, 10]]
    [[3, 3, 3], [3, 3, 3], [4, 4, 4]]
    """

    def __init__(
        self,
        labels: np.ndarray,
        num_partitions: int,
        alpha: float,
        seed: int,
        min_partition_size: int = 1,
        max_tries: int = 10,
    ) -> None:
        if not alpha > 0:
            raise ValueError(
                f"Dirichlet alpha must be > 0, got {alpha}; e.g. 0.1 (skewed) .. 100 (near IID)."
            )
        if min_partition_size < 1 or max_tries < 1:
            raise ValueError(
                f"min_partition_size and max_tries must be >= 1, got {min_partition_size} and {max_tries}."
            )
        self._alpha = alpha
        self._min_partition_size = min_partition_size
        self._max_tries = max_tries
        super().__init__(labels, num_partitions, seed)

    def _assign(self, labels: np.ndarray, num_partitions: int, rng: np.random.Generator) -> np.ndarray:
        _, counts = np.unique(labels, return_counts=True)
        classes = np.split(np.argsort(labels, kind="stable"), np.cumsum(counts)[:-1])
        owner = np.empty(len(labels), dtype=np.int64)
        smallest = 0
        for _ in range(self._max_tries):
            for members in classes:
                share = rng.dirichlet(np.full(num_partitions, self._alpha))
                cuts = np.floor(np.cumsum(share) * len(members)).astype(np.int64)
                cuts[-1] = len(members)
                counts = np.diff(cuts, prepend=0)
                owner[rng.permutation(members)] = np.repeat(np.arange(num_partitions), counts)
            smallest = int(np.bincount(owner, minlength=num_partitions).min())
            if smallest >= self._min_partition_size:
                return owner
        raise ValueError(
            f"Dirichlet partitioning (alpha={self._alpha}) of {len(labels)} examples into {num_partitions} "
            f"partitions left a partition with {smallest} < min_partition_size={self._min_partition_size} "
            f"examples in each of {self._max_tries} tries; raise alpha (`dirichlet-alpha`), use fewer "
            "partitions, or use more data (`max-examples`)."
        )


class SpecialtyPartitioner(Partitioner):
    """Specialty-hospital split: each site gets a few dominant labels and equal size.

    Algorithm (all draws from one seeded generator):

    1. Order the ``L`` distinct labels by count, largest first (ties in a seeded random order); deal them
       to the sites round-robin, ``labels_per_site`` rounds: in round ``r`` site ``i`` takes the label at
       position ``(r * num_partitions + i) mod L`` of that order, moving on to the next position when the
       site already has it. The largest labels thus go to different sites; when
       ``num_partitions * labels_per_site > L`` labels are shared by several sites.
    2. Site sizes are ``n // num_partitions`` or one more; site ``i`` of size ``m_i`` aims at
       ``round(share * m_i)`` examples of its dominant labels.
    3. Each label's examples are claimed in equal parts by the sites holding it as dominant; each site
       takes its target (or all it claimed, if less) from its claims, in proportion to their sizes.
    4. The remaining examples fill the sites up to their sizes in 4 passes over the sites (alternating
       direction, so no site is always last): in pass ``p`` a site takes ``ceil(need / (4 - p))`` of what
       it still needs from the labels not dominant for it, in proportion to what is left of each. What a
       site still needs after that comes from whatever is left, in proportion.
    5. Every count is realised by handing out each label's examples in a seeded random order.

    Counts are apportioned by largest remainder, so every example is assigned exactly once. A site's
    dominant share is ``share`` whenever its dominant labels have enough examples; it is lower for a
    site whose dominant labels are too small (e.g. on strongly imbalanced labels), and can be slightly
    higher when little else is left.

    Parameters
    ----------
    labels, num_partitions, seed
        As in :class:`Partitioner`.
    labels_per_site
        Dominant labels per site, ``1 .. number of distinct labels``.
    share
        Target share of each site's examples from its dominant labels, in ``[0, 1]``.

    Examples
    --------
    >>> labels = np.repeat(np.arange(4), 10)
    >>> p = SpecialtyPartitioner(labels, num_partitions=2, labels_per_site=2, share=0.8, seed=0)
    >>> p.dominant_labels
    ((2, 1), (0, 3))
    >>> [np.bincount(labels[p.load_partition(i)], minlength=4).tolist() for i in range(2)]
    [[2, 8, 8, 2], [8, 2, 2, 8]]
    """

    def __init__(
        self, labels: np.ndarray, num_partitions: int, labels_per_site: int, share: float, seed: int
    ) -> None:
        num_labels = len(np.unique(labels))
        if not 1 <= labels_per_site <= num_labels:
            raise ValueError(
                f"labels_per_site must be in 1..{num_labels} (the distinct labels), got {labels_per_site}; "
                "lower `specialty-labels`."
            )
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"share must be in [0, 1], got {share}.")
        self._labels_per_site = labels_per_site
        self._share = share
        self._dominant: tuple[tuple[int, ...], ...] = ()
        super().__init__(labels, num_partitions, seed)

    @property
    def dominant_labels(self) -> tuple[tuple[int, ...], ...]:
        """Dominant label ids of each site, in the order they were dealt."""
        return self._dominant

    def _assign(self, labels: np.ndarray, num_partitions: int, rng: np.random.Generator) -> np.ndarray:
        classes, counts = np.unique(labels, return_counts=True)
        dealt = _deal(counts, num_partitions, self._labels_per_site, rng)
        self._dominant = tuple(tuple(int(classes[c]) for c in site) for site in dealt)
        dominant = np.zeros((num_partitions, len(classes)), dtype=bool)
        for i, site in enumerate(dealt):
            dominant[i, site] = True

        sizes = np.diff(np.arange(num_partitions + 1) * len(labels) // num_partitions)
        claims = np.zeros((num_partitions, len(classes)), dtype=np.int64)
        for c in np.flatnonzero(dominant.any(axis=0)):
            holders = np.flatnonzero(dominant[:, c])
            claims[holders, c] = np.diff(np.arange(len(holders) + 1) * counts[c] // len(holders))
        take = np.stack(
            [
                _apportion(claims[i], min(round(self._share * sizes[i]), int(claims[i].sum())))
                for i in range(num_partitions)
            ]
        )
        left = counts - take.sum(axis=0)
        for p in range(_FILL_PASSES):
            for i in range(num_partitions) if p % 2 == 0 else reversed(range(num_partitions)):
                need = sizes[i] - take[i].sum()
                avail = np.where(dominant[i], 0, left)
                got = _apportion(avail, min(-(-need // (_FILL_PASSES - p)), int(avail.sum())))
                take[i] += got
                left -= got
        for i in range(num_partitions):
            got = _apportion(left, int(sizes[i] - take[i].sum()))
            take[i] += got
            left -= got

        owner = np.empty(len(labels), dtype=np.int64)
        members = np.split(np.argsort(labels, kind="stable"), np.cumsum(counts)[:-1])
        for c, idx in enumerate(members):
            owner[rng.permutation(idx)] = np.repeat(np.arange(num_partitions), take[:, c])
        return owner


def _deal(
    counts: np.ndarray, num_partitions: int, labels_per_site: int, rng: np.random.Generator
) -> list[list[int]]:
    """Deal label positions to sites round-robin, largest labels first (step 1 of SpecialtyPartitioner)."""
    shuffled = rng.permutation(len(counts))
    order = shuffled[np.argsort(-counts[shuffled], kind="stable")]
    dealt: list[list[int]] = [[] for _ in range(num_partitions)]
    for r in range(labels_per_site):
        for i, site in enumerate(dealt):
            pos = r * num_partitions + i
            while int(order[pos % len(order)]) in site:
                pos += 1
            site.append(int(order[pos % len(order)]))
    return dealt


def _apportion(weights: np.ndarray, k: int) -> np.ndarray:
    """Split ``k <= weights.sum()`` units in proportion to ``weights`` (largest remainder, each <= weight)."""
    if k == 0:
        return np.zeros(len(weights), dtype=np.int64)
    quota = weights * (k / weights.sum())
    out = np.floor(quota).astype(np.int64)
    out[np.argsort(out - quota, kind="stable")[: k - out.sum()]] += 1
    return out


def make_partitioner(
    name: str,
    labels: np.ndarray,
    num_partitions: int,
    *,
    alpha: float,
    labels_per_site: int,
    share: float,
    seed: int,
) -> Partitioner:
    """Build the partitioner called ``name`` (one of :data:`fedtune.common.options.PARTITIONERS`).

    ``alpha`` is used by ``dirichlet`` only; ``labels_per_site`` and ``share`` by ``specialty`` only.

    Raises
    ------
    ValueError
        On an unknown name (the message lists the valid ones) or invalid parameters.
    """
    if name == "iid":
        return IidPartitioner(labels, num_partitions, seed)
    if name == "dirichlet":
        return DirichletPartitioner(labels, num_partitions, alpha, seed)
    if name == "specialty":
        return SpecialtyPartitioner(labels, num_partitions, labels_per_site, share, seed)
    raise ValueError(f"Unknown partitioning {name!r}; valid: {', '.join(options.PARTITIONERS)}.")
