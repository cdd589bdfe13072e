"""Head statistics under SecAgg+'s quantisation: the frame of the second exchange keeps the solve exact."""

from __future__ import annotations

import numpy as np
from fedtune.common.config import FedConfig
from fedtune.common.head_fit import FeatureMoments, HeadStatistics, solve_lda
from fedtune.server.head_fit import FLOOR_STEPS, SPREAD_SHARE, secagg_frame
from flwr.common.secure_aggregation.quantization import dequantize, quantize


def _features(seed: int, wiggle: float = 1e-3) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """3 label-skewed sites whose features sit far from 0 and vary little about it (a trained encoder)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(3, 8))
    xs, ys = [], []
    for n, mix in ((150, [0.8, 0.1, 0.1]), (60, [0.1, 0.8, 0.1]), (90, [0.2, 0.2, 0.6])):
        y = rng.choice(3, size=n, p=mix)
        xs.append(0.3 + wiggle * (centres[y] + rng.normal(size=(n, 8))))
        ys.append(y)
    return xs, ys


def _secagg_mean(
    sites: list[list[np.ndarray]], weights: list[int], cfg: FedConfig, max_weight: float
) -> list:
    """Flower SecAgg+'s arithmetic: weigh ``n / max_weight``, clip, quantise, sum, dequantise, divide."""
    clip, levels = cfg.secagg_clipping_range, cfg.secagg_quantization_range
    ratios = [n / max_weight for n in weights]
    sent = [[r * a for a in arrays] for arrays, r in zip(sites, ratios, strict=True)]
    assert max(np.abs(a).max() for arrays in sent for a in arrays) <= clip  # nothing clipped
    total = [sum(q) for q in zip(*(quantize(arrays, clip, levels) for arrays in sent), strict=True)]
    return [(v - (len(sites) - 1) * clip) / sum(ratios) for v in dequantize(total, clip, levels)]


def _secagg_statistics(sites: list[HeadStatistics], cfg: FedConfig, max_weight: float) -> HeadStatistics:
    weights = [s.examples for s in sites]
    mean = _secagg_mean([s.arrays(np.float64) for s in sites], weights, cfg, max_weight)
    return HeadStatistics.from_arrays(mean, sum(weights))


def _secagg_moments(xs: list[np.ndarray], cfg: FedConfig, max_weight: float) -> FeatureMoments:
    weights = [len(x) for x in xs]
    mean = _secagg_mean([FeatureMoments.of(x).arrays(np.float64) for x in xs], weights, cfg, max_weight)
    return FeatureMoments.from_arrays(mean, sum(weights))


def _error(stats: HeadStatistics, exact: tuple[np.ndarray, np.ndarray], shrinkage: float) -> float:
    weight, _ = solve_lda(stats, shrinkage)
    return float(np.linalg.norm(weight - exact[0]) / np.linalg.norm(exact[0]))


def test_the_framed_exchange_solves_the_exact_head_where_the_unframed_one_does_not() -> None:
    # Prepare: the defaults' clipping and quantisation ranges; SecAgg+'s max weight = all examples
    cfg = FedConfig()
    xs, ys = _features(seed=0)
    max_weight = float(sum(len(x) for x in xs))
    exact = solve_lda(
        HeadStatistics.pooled([HeadStatistics.of(x, y, 3) for x, y in zip(xs, ys, strict=True)]),
        cfg.head_fit_shrinkage,
    )
    np.random.seed(0)  # Flower's stochastic rounding

    # Execute: the statistics as the features are; the moments, then the statistics in their frame
    raw = _secagg_statistics(
        [HeadStatistics.of(x, y, 3) for x, y in zip(xs, ys, strict=True)], cfg, max_weight
    )
    frame = secagg_frame(cfg, max_weight, _secagg_moments(xs, cfg, max_weight))
    framed_sites = [HeadStatistics.of(frame.apply(x), y, 3) for x, y in zip(xs, ys, strict=True)]
    framed = _secagg_statistics(framed_sites, cfg, max_weight)

    # Assert: the quantised features' head is far off, the framed one within 0.1% of the exact head;
    # every site's weighted value stays within the share of the clipping range the frame allows
    assert _error(raw, exact, cfg.head_fit_shrinkage) > 0.3
    assert _error(frame.undo(framed), exact, cfg.head_fit_shrinkage) < 1e-3
    peak = max(s.examples / max_weight * np.diag(s.second_moment)[:8].max() for s in framed_sites)
    assert peak <= SPREAD_SHARE * cfg.secagg_clipping_range * 1.01
    assert max(s.examples / max_weight * np.abs(s.arrays(np.float64)[0]).max() for s in framed_sites) <= 2.0


def test_a_variance_the_moments_cannot_resolve_is_floored() -> None:
    # Prepare: one feature constant at every site
    cfg = FedConfig()
    xs, ys = _features(seed=1, wiggle=0.1)
    for x in xs:
        x[:, 2] = 0.25
    max_weight = 2.0 * sum(len(x) for x in xs)  # the sites weigh half the normaliser

    # Execute
    frame = secagg_frame(cfg, max_weight, FeatureMoments.of(np.concatenate(xs)))

    # Assert: its scale is that of FLOOR_STEPS quantisation steps in the pooled mean, the others' that
    # of their variance; a load of 1/2 doubles the spread a frame asks for
    load = 0.5
    step = 2 * cfg.secagg_clipping_range / cfg.secagg_quantization_range / load
    spread = SPREAD_SHARE * cfg.secagg_clipping_range / load
    assert frame.scale[2] == np.sqrt(FLOOR_STEPS * step / spread)
    variance = np.concatenate(xs).var(axis=0)
    np.testing.assert_allclose(frame.scale[[0, 1, 3]], np.sqrt(variance[[0, 1, 3]] / spread), rtol=1e-6)
