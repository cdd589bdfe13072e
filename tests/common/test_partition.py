"""Tests of fedtune.common.partition: cover/disjoint, determinism, skew, specialty shares, errors."""

from __future__ import annotations

import numpy as np
import pytest
from fedtune.common import options
from fedtune.common.partition import (
    DirichletPartitioner,
    IidPartitioner,
    Partitioner,
    SpecialtyPartitioner,
    make_partitioner,
)


def _labels(counts: list[int], seed: int = 0) -> np.ndarray:
    """Shuffled labels with ``counts[c]`` examples of class ``c``."""
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(len(counts)), counts))


def _make(name: str, labels: np.ndarray, num_partitions: int, seed: int) -> Partitioner:
    return make_partitioner(name, labels, num_partitions, alpha=0.5, labels_per_site=2, share=0.8, seed=seed)


def _parts(p: Partitioner) -> list[np.ndarray]:
    return [p.load_partition(i) for i in range(p.num_partitions)]


def _mean_label_entropy(p: Partitioner, labels: np.ndarray) -> float:
    entropies = []
    for part in _parts(p):
        freq = np.bincount(labels[part]) / len(part)
        freq = freq[freq > 0]
        entropies.append(float(-(freq * np.log(freq)).sum()))
    return float(np.mean(entropies))


@pytest.mark.parametrize("name", tuple(options.PARTITIONERS))
@pytest.mark.parametrize(
    ("counts", "num_partitions"),
    [
        ([50, 30, 20], 1),
        ([50, 30, 20], 7),
        ([500, 200, 100, 50, 5, 1], 10),
        ([3, 3, 3, 3], 12),
        ([400] * 10, 20),
    ],
)
@pytest.mark.parametrize("seed", [0, 1, 42])
def test_partitions_are_disjoint_covering_sorted_and_non_empty(
    name: str, counts: list[int], num_partitions: int, seed: int
) -> None:
    # Prepare
    labels = _labels(counts, seed)

    # Execute
    try:
        parts = _parts(_make(name, labels, num_partitions, seed))
    except ValueError as exc:  # a Dirichlet draw may leave a site empty: then it must say so
        assert name == "dirichlet" and "raise alpha" in str(exc)
        return

    # Assert
    assert len(parts) == num_partitions
    assert all(len(part) > 0 for part in parts)
    assert all(part.dtype == np.int64 and np.all(np.diff(part) > 0) for part in parts)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))


@pytest.mark.parametrize("name", tuple(options.PARTITIONERS))
def test_partitions_are_deterministic_per_seed(name: str) -> None:
    # Prepare
    labels = _labels([300, 200, 100, 50])

    # Execute
    a, b, c = (_parts(_make(name, labels, 5, seed)) for seed in (3, 3, 4))

    # Assert
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, z) for x, z in zip(a, c, strict=True))


def test_iid_sizes_differ_by_at_most_one_and_follow_the_label_mix() -> None:
    # Prepare
    labels = _labels([700, 300])

    # Execute
    parts = _parts(IidPartitioner(labels, num_partitions=7, seed=0))

    # Assert
    sizes = [len(part) for part in parts]
    assert max(sizes) - min(sizes) <= 1
    assert all(0.55 < np.mean(labels[part] == 0) < 0.85 for part in parts)


def test_dirichlet_skew_grows_as_alpha_shrinks() -> None:
    # Prepare
    labels = _labels([200] * 10)

    # Execute
    entropy = {
        alpha: np.mean(
            [_mean_label_entropy(DirichletPartitioner(labels, 10, alpha, seed), labels) for seed in range(3)]
        )
        for alpha in (0.1, 1.0, 100.0)
    }

    # Assert
    assert entropy[0.1] < entropy[1.0] < entropy[100.0]
    assert entropy[100.0] > 0.95 * np.log(10)
    assert entropy[0.1] < 0.5 * np.log(10)


def test_dirichlet_respects_min_partition_size() -> None:
    # Prepare
    labels = _labels([100] * 5)

    # Execute
    p = DirichletPartitioner(labels, 5, alpha=1.0, seed=0, min_partition_size=40, max_tries=200)

    # Assert
    assert min(len(part) for part in _parts(p)) >= 40


def test_dirichlet_gives_up_with_advice() -> None:
    # Prepare
    labels = _labels([10] * 3)

    # Execute / Assert
    with pytest.raises(ValueError, match=r"raise alpha .* fewer partitions, or use more data"):
        DirichletPartitioner(labels, 10, alpha=0.01, seed=0, min_partition_size=3, max_tries=5)


@pytest.mark.parametrize(
    ("counts", "num_partitions", "labels_per_site", "share"),
    [
        ([300] * 10, 5, 2, 0.8),
        ([300] * 10, 5, 2, 0.5),
        ([900] * 4 + [100] * 4, 4, 1, 0.9),
        ([500] * 4, 8, 1, 0.7),  # sites share dominant labels
        ([300] * 9, 3, 3, 1.0),
        ([300] * 6, 3, 2, 0.0),
    ],
)
def test_specialty_sites_hold_share_of_their_dominant_labels(
    counts: list[int], num_partitions: int, labels_per_site: int, share: float
) -> None:
    # Prepare
    labels = _labels(counts)

    # Execute
    p = SpecialtyPartitioner(labels, num_partitions, labels_per_site, share, seed=0)

    # Assert
    parts = _parts(p)
    sizes = [len(part) for part in parts]
    assert max(sizes) - min(sizes) <= 1
    assert all(len(set(d)) == labels_per_site for d in p.dominant_labels)
    for part, dominant in zip(parts, p.dominant_labels, strict=True):
        site_counts = np.bincount(labels[part], minlength=len(counts))
        top = np.sort(site_counts)[::-1][:labels_per_site].sum() / len(part)
        assert abs(np.isin(labels[part], dominant).mean() - share) < 0.1
        if share >= 0.5:  # then the dominant labels are the site's most frequent ones
            assert abs(top - share) < 0.1


def test_specialty_spreads_the_largest_labels_over_sites() -> None:
    # Prepare
    labels = _labels([900, 800, 700, 50, 40, 30])

    # Execute
    p = SpecialtyPartitioner(labels, 3, labels_per_site=2, share=0.8, seed=0)

    # Assert
    assert sorted(d[0] for d in p.dominant_labels) == [0, 1, 2]


def test_specialty_share_is_capped_by_the_supply_of_dominant_labels() -> None:
    # Prepare: 4 sites of 300 examples, but each dominant label has only 200
    labels = _labels([200] * 6)

    # Execute
    p = SpecialtyPartitioner(labels, 4, labels_per_site=1, share=0.9, seed=0)

    # Assert
    for part, dominant in zip(_parts(p), p.dominant_labels, strict=True):
        assert len(part) == 300
        assert np.isin(labels[part], dominant).sum() == 200


@pytest.mark.parametrize("name", ["iid", "dirichlet"])
def test_a_thousand_partitions_of_sixty_thousand_examples_cover_them_all(name: str) -> None:
    # Prepare
    labels = _labels([40_000, 10_000, 5_000, 3_000, 1_500, 500])

    # Execute
    p = make_partitioner(name, labels, 1000, alpha=1.0, labels_per_site=2, share=0.8, seed=0)

    # Assert: every example in exactly one partition, none empty (`fedtune bench scale` times it)
    parts = [p.load_partition(i) for i in range(1000)]
    assert p.num_partitions == 1000 and all(len(x) > 0 for x in parts)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))


@pytest.mark.parametrize("name", tuple(options.PARTITIONERS))
def test_more_partitions_than_examples_is_an_error(name: str) -> None:
    # Prepare
    labels = _labels([2, 2])

    # Execute / Assert
    with pytest.raises(ValueError, match=r"num_partitions=5 exceeds the 4 examples"):
        _make(name, labels, 5, seed=0)


@pytest.mark.parametrize("partition_id", [-1, 3, 10])
def test_bad_partition_id_names_the_valid_range(partition_id: int) -> None:
    # Prepare
    p = IidPartitioner(_labels([5, 5]), 3, seed=0)

    # Execute / Assert
    with pytest.raises(
        ValueError, match=rf"partition_id={partition_id} is out of range; valid ids are 0\.\.2"
    ):
        p.load_partition(partition_id)


def test_partition_indices_are_read_only() -> None:
    # Prepare
    part = IidPartitioner(_labels([5, 5]), 2, seed=0).load_partition(0)

    # Execute / Assert
    with pytest.raises(ValueError):
        part[0] = 1


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (
            lambda y: make_partitioner("shards", y, 2, alpha=1.0, labels_per_site=1, share=0.5, seed=0),
            "iid, dirichlet, specialty",
        ),
        (lambda y: DirichletPartitioner(y, 2, alpha=0.0, seed=0), "alpha must be > 0"),
        (lambda y: DirichletPartitioner(y, 2, alpha=1.0, seed=0, min_partition_size=0), "min_partition_size"),
        (
            lambda y: SpecialtyPartitioner(y, 2, labels_per_site=3, share=0.5, seed=0),
            r"labels_per_site must be in 1\.\.2",
        ),
        (lambda y: SpecialtyPartitioner(y, 2, labels_per_site=1, share=1.5, seed=0), "share must be in"),
        (lambda y: IidPartitioner(y, 0, seed=0), "num_partitions must be >= 1"),
        (lambda y: IidPartitioner(y.astype(float), 2, seed=0), "1-D integer array"),
    ],
)
def test_bad_parameters_are_errors(build: object, match: str) -> None:
    # Prepare
    labels = _labels([5, 5])

    # Execute / Assert
    with pytest.raises(ValueError, match=match):
        build(labels)  # type: ignore[operator]


def test_the_run_configs_dirichlet_alpha_reaches_the_simulated_sites() -> None:
    from fedtune.common.config import parse_run_config
    from fedtune.common.sites import simulated_site

    def skew(alpha: float) -> float:
        """Mean total-variation distance of 5 sites' label mixes from the pooled mix."""
        cfg = parse_run_config({"max-examples": 600, "dirichlet-alpha": alpha})
        sites = [simulated_site(cfg, i, 5).train for i in range(5)]
        k = len(sites[0].label_names)
        counts = np.array([np.bincount(s.labels, minlength=k) for s in sites], dtype=float)
        pooled = counts.sum(0) / counts.sum()
        return float(np.mean(0.5 * np.abs(counts / counts.sum(1, keepdims=True) - pooled).sum(1)))

    # Execute / Assert: a small alpha skews the sites far more than a large one
    assert skew(0.05) > 0.5 > 0.2 > skew(100.0)
