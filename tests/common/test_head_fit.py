"""Closed-form classifier heads: statistics that pool over sites, the LDA solve, the model's head."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from fedtune.common.config import FedConfig
from fedtune.common.data import TextDataset
from fedtune.common.head_fit import (
    ABSENT_MARGIN,
    FeatureMoments,
    HeadStatistics,
    StatisticsFrame,
    head_inputs,
    set_head,
    solve_lda,
)
from fedtune.common.model import PeftSpec, build_peft_model, head_layer, load_tokenizer
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _blobs(n: int, d: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian classes with distinct means and a shared, correlated covariance."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(classes, size=n)
    centres = rng.normal(size=(classes, d))
    mix = rng.normal(size=(d, d)) / d**0.5
    return centres[labels] + rng.normal(size=(n, d)) @ mix, labels


def test_statistics_of_sites_pool_to_those_of_their_examples_together() -> None:
    # Prepare: 3 sites of very different sizes and label mixes
    x, y = _blobs(300, 5, 4, seed=0)
    order = np.argsort(y, kind="stable")  # label skew: each site mostly holds a few classes
    cuts = [(0, 40), (40, 250), (250, 300)]

    # Execute
    sites = [HeadStatistics.of(x[order[a:b]], y[order[a:b]], 4) for a, b in cuts]
    pooled = HeadStatistics.pooled(sites)

    # Assert: exactly the statistics of all examples; the last row of the cross moment = class shares
    together = HeadStatistics.of(x, y, 4)
    np.testing.assert_allclose(pooled.second_moment, together.second_moment, atol=1e-12)
    np.testing.assert_allclose(pooled.cross_moment, together.cross_moment, atol=1e-12)
    assert pooled.examples == 300
    np.testing.assert_allclose(together.cross_moment[5], np.bincount(y, minlength=4) / 300)
    np.testing.assert_allclose(together.second_moment[:5, 5], x.mean(axis=0))


def test_lda_head_is_scikit_learns_with_the_class_prior_removed() -> None:
    # Prepare: unbalanced classes
    x, y = _blobs(400, 6, 3, seed=1)
    y[:150] = 0
    shares = np.bincount(y) / len(y)

    # Execute
    weight, bias = solve_lda(HeadStatistics.of(x, y, 3), shrinkage=0.0)

    # Assert: scikit-learn's LDA (pooled within-class covariance, empirical prior) scores each class
    # log(prior) higher; the solved head gives every class the same prior and centres the scores
    reference = LinearDiscriminantAnalysis(solver="lsqr", priors=shares).fit(x, y)
    expected = reference.decision_function(x) - np.log(shares)
    scores = x @ weight.T + bias
    np.testing.assert_allclose(scores, expected - expected.mean(axis=1, keepdims=True), atol=1e-6)
    np.testing.assert_allclose(scores.mean(axis=1), 0.0, atol=1e-9)
    assert (scores.argmax(axis=1) == reference.predict(x)).mean() > 0.8  # the prior moves few examples

    # Execute: under a limit every value fits it, and the same class wins
    limited_w, limited_b = solve_lda(HeadStatistics.of(x, y, 3), shrinkage=0.0, limit=0.5)

    # Assert
    assert max(np.abs(limited_w).max(), np.abs(limited_b).max()) == pytest.approx(0.5)
    np.testing.assert_array_equal((x @ limited_w.T + limited_b).argmax(axis=1), scores.argmax(axis=1))


def test_shrinkage_pulls_the_covariance_towards_a_scaled_identity() -> None:
    # Prepare
    x, y = _blobs(200, 4, 2, seed=2)
    stats = HeadStatistics.of(x, y, 2)
    means = np.stack([x[y == k].mean(axis=0) for k in (0, 1)], axis=1)
    within = sum((y == k).mean() * np.cov(x[y == k].T, bias=True) for k in (0, 1))
    shrunk = 0.7 * within + 0.3 * np.trace(within) / 4 * np.eye(4)

    # Execute
    weight, bias = solve_lda(stats, shrinkage=0.3)

    # Assert: by hand, before centring over the two classes
    coef = np.linalg.solve(shrunk, means)
    raw_bias = -0.5 * np.einsum("dk,dk->k", means, coef)
    np.testing.assert_allclose(weight, coef.T - coef.T.mean(axis=0), atol=1e-9)
    np.testing.assert_allclose(bias, raw_bias - raw_bias.mean(), atol=1e-9)
    with pytest.raises(ValueError, match="shrinkage must be in \\[0, 1\\], got 1.5"):
        solve_lda(stats, shrinkage=1.5)


def test_a_class_without_examples_is_never_predicted() -> None:
    # Prepare: 3 classes declared, class 1 has no example
    x, y = _blobs(120, 3, 2, seed=3)
    y = np.where(y == 1, 2, 0)

    # Execute
    weight, bias = solve_lda(HeadStatistics.of(x, y, 3), shrinkage=0.1)

    # Assert: the winning score is at least 0 for any input, the absent class scores -ABSENT_MARGIN
    assert not weight[1].any() and bias[1] == -ABSENT_MARGIN
    far = np.random.default_rng(0).normal(scale=50.0, size=(500, 3))  # far outside the training data
    for inputs in (x, far):
        scores = inputs @ weight.T + bias
        assert 1 not in scores.argmax(axis=1) and (scores.max(axis=1) >= 0).all()
    assert set((x @ weight.T + bias).argmax(axis=1)) == {0, 2}
    limited_w, limited_b = solve_lda(HeadStatistics.of(x, y, 3), shrinkage=0.1, limit=2.0)
    assert limited_b[1] == -2.0 and 1 not in (far @ limited_w.T + limited_b).argmax(axis=1)


def test_statistics_refuse_empty_sets() -> None:
    with pytest.raises(ValueError, match="no examples"):
        HeadStatistics.of(np.zeros((0, 3)), np.zeros(0, dtype=int), 2)
    with pytest.raises(ValueError, match="hold no examples"):
        HeadStatistics.pooled([])


def test_head_inputs_and_set_head_act_on_the_models_classifier(tiny_base_model: Path) -> None:
    # Prepare
    model = build_peft_model(PeftSpec.from_config(FedConfig(seed=5), tiny_base_model, num_labels=2))
    tokenizer = load_tokenizer(tiny_base_model)
    ds = TextDataset(
        texts=("chest pain", "fracture of the left femur", "type 2 diabetes", "asthma"),
        labels=np.array([0, 1, 1, 0]),
        label_names=("a", "b"),
        serialisation="text",
        source="test",
    )
    kwargs = {"batch_size": 3, "max_length": 16, "device": torch.device("cpu")}

    # Execute
    features = head_inputs(model, tokenizer, ds, **kwargs)
    assert not head_layer(model)._forward_hooks  # the capturing hook is gone
    rng = np.random.default_rng(0)
    weight, bias = rng.normal(size=(2, features.shape[1])), rng.normal(size=2)
    set_head(model, weight, bias)

    # Assert: the model's logits are the new head applied to the features it was handed
    with torch.no_grad():
        inputs = tokenizer(list(ds.texts), padding=True, return_tensors="pt")
        logits = model.eval()(**inputs).logits.numpy()
    np.testing.assert_allclose(logits, features @ weight.T + bias, rtol=1e-4, atol=1e-4)
    assert features.shape[0] == 4 and np.unique(features, axis=0).shape[0] == 4
    with pytest.raises(ValueError, match=r"set_head: got weight \(1, "):
        set_head(model, weight[:1], bias)


@pytest.mark.parametrize(
    ("arrays", "needle"),
    [
        ([np.zeros(6)], "2 tensors, got 1"),
        ([np.zeros((3, 3)), np.zeros((3, 2))], "do not match"),  # the full matrix, not its triangle
        ([np.zeros(6), np.zeros((4, 2))], "do not match"),
        ([np.zeros(6), np.zeros(3)], "do not match"),
        ([np.full(6, np.nan), np.zeros((3, 2))], "non-finite"),
        ([np.zeros(6), np.full((3, 2), np.inf)], "non-finite"),
    ],
)
def test_malformed_statistics_are_named_and_refused(arrays: list[np.ndarray], needle: str) -> None:
    from fedtune.common.updates import statistics_defect

    assert needle in statistics_defect(arrays)
    with pytest.raises(ValueError, match=needle):
        HeadStatistics.from_arrays(arrays, 5)


def test_statistics_travel_as_the_upper_triangle_and_come_back_whole() -> None:
    from fedtune.common.updates import statistics_defect

    # Prepare: 3 features (k = 4 with the constant), 2 classes
    rng = np.random.default_rng(0)
    stats = HeadStatistics.of(rng.normal(size=(7, 3)), np.array([0, 1, 1, 0, 1, 0, 0]), 2)

    # Execute
    arrays = stats.arrays()
    back = HeadStatistics.from_arrays(arrays, 7)

    # Assert: 10 = 4 * 5 / 2 values for the symmetric matrix, row by row from its upper triangle
    assert [a.shape for a in arrays] == [(10,), (4, 2)] and statistics_defect(arrays) == ""
    assert arrays[0].dtype == np.float32 and stats.arrays(np.float64)[0].dtype == np.float64
    np.testing.assert_allclose(arrays[0][:4], stats.second_moment[0], rtol=1e-6)
    np.testing.assert_allclose(back.second_moment, stats.second_moment, rtol=1e-6)
    np.testing.assert_allclose(back.cross_moment, stats.cross_moment, rtol=1e-6)
    assert back.examples == 7


def test_statistics_taken_in_a_frame_map_back_to_the_features_exactly() -> None:
    # Prepare: 3 skewed sites; a frame from the pooled statistics, spread 0.5, one feature constant
    x, y = _blobs(300, 5, 4, seed=2)
    x[:, 3] = 7.0
    order = np.argsort(y, kind="stable")
    cuts = [(0, 40), (40, 250), (250, 300)]
    together = HeadStatistics.of(x, y, 4)
    frame = StatisticsFrame.of(FeatureMoments.of(x), spread=0.5, floor=1e-6)

    # Execute
    framed = HeadStatistics.pooled(
        [HeadStatistics.of(frame.apply(x[order[a:b]]), y[order[a:b]], 4) for a, b in cuts]
    )
    back = frame.undo(framed)

    # Assert: in the frame every feature is centred with mean square 0.5 (the constant one at the floor:
    # 0); mapped back, exactly the statistics of the features themselves
    np.testing.assert_allclose(framed.second_moment[:5, 5], 0.0, atol=1e-12)
    np.testing.assert_allclose(np.diag(framed.second_moment)[[0, 1, 2, 4]], 0.5)
    assert framed.second_moment[3, 3] == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(frame.centre, x.mean(axis=0))
    np.testing.assert_allclose(frame.scale[3], np.sqrt(1e-6 / 0.5))
    np.testing.assert_allclose(back.second_moment, together.second_moment, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(back.cross_moment, together.cross_moment, rtol=1e-10, atol=1e-12)
    assert back.examples == 300


def test_a_frame_travels_as_bytes_and_a_malformed_one_is_refused() -> None:
    # Prepare
    frame = StatisticsFrame(centre=np.array([0.5, -1.0, 2.0]), scale=np.array([1e-3, 2.0, 3.0]))

    # Execute
    back = StatisticsFrame.from_bytes(frame.to_bytes())

    # Assert: exact round trip; a truncated or empty payload, a bad scale or a wrong width is refused
    np.testing.assert_array_equal(back.centre, frame.centre)
    np.testing.assert_array_equal(back.scale, frame.scale)
    for payload in (frame.to_bytes()[:-8], b""):
        with pytest.raises(ValueError, match="not a centre and a scale"):
            StatisticsFrame.from_bytes(payload)
    for scale in (np.array([1.0, 0.0, 1.0]), np.array([1.0, np.nan, 1.0])):
        with pytest.raises(ValueError, match="scale finite and positive"):
            StatisticsFrame(centre=np.zeros(3), scale=scale)
    with pytest.raises(ValueError, match="same 1-d shape"):
        StatisticsFrame(centre=np.zeros(3), scale=np.ones(2))
    with pytest.raises(ValueError, match="frame is for 3 features, the head receives"):
        frame.apply(np.zeros((4, 5)))


def test_feature_moments_pool_and_travel_as_two_vectors() -> None:
    from fedtune.common.updates import moments_defect

    # Prepare: 2 sites
    x, _ = _blobs(50, 4, 2, seed=3)

    # Execute
    sites = [FeatureMoments.of(x[:20]), FeatureMoments.of(x[20:])]
    arrays = [np.average([s.arrays(np.float64)[i] for s in sites], axis=0, weights=[20, 30]) for i in (0, 1)]
    pooled = FeatureMoments.from_arrays(arrays, 50)

    # Assert: the example-weighted mean of the sites' moments is the moments of their examples together;
    # a malformed upload is refused
    np.testing.assert_allclose(pooled.mean, x.mean(axis=0))
    np.testing.assert_allclose(pooled.mean_square, (x**2).mean(axis=0))
    assert [a.shape for a in sites[0].arrays()] == [(4,), (4,)] and sites[0].arrays()[0].dtype == np.float32
    assert moments_defect(arrays) == ""
    for bad, needle in (
        ([arrays[0]], "2 tensors, got 1"),
        ([arrays[0], arrays[1][:3]], "do not match"),
        ([arrays[0], np.full(4, np.inf)], "non-finite"),
    ):
        assert needle in moments_defect(bad)
        with pytest.raises(ValueError, match=needle):
            FeatureMoments.from_arrays(bad, 50)
    with pytest.raises(ValueError, match="no examples"):
        FeatureMoments.of(np.zeros((0, 4)))
