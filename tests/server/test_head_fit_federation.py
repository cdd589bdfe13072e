"""``head-fit=lda`` federated in process (:mod:`local_grid`): the head solved from summed statistics."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import fake_task_identity
from fedtune.common.adapters import set_adapter_arrays
from fedtune.common.audit import load_arrays
from fedtune.common.audit_report import build_report
from fedtune.common.config import FedConfig
from fedtune.common.head_fit import HeadStatistics, head_inputs, solve_lda
from fedtune.common.model import bring_up
from fedtune.common.run_folder import (
    HEAD_MOMENTS_LABEL,
    RunFolder,
    aggregate_round_name,
    global_round_name,
    head_stats_round_name,
    received_round_name,
)
from fedtune.common.sites import simulated_site
from fedtune.server.head_fit import head_indices
from fedtune.server.run_state import RunState
from local_grid import fast_config, run_federation

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module", autouse=True)
def _task() -> Iterator[None]:
    with fake_task_identity():
        yield


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory, tiny_base_model: Path) -> RunState:
    """3 sites, 2 rounds on the Pima table under SecAgg+, the head solved after every round, audited."""
    out = tmp_path_factory.mktemp("head-fit")
    cfg = fast_config(
        out, tiny_base_model, secure_aggregation=True, head_fit="lda", audit=True, secagg_clipping_range=2.0
    )
    return run_federation(cfg)


def _pooled_by_hand(
    cfg: FedConfig, arrays: list[np.ndarray], sites: tuple[int, ...] = (0, 1, 2)
) -> HeadStatistics:
    """The statistics of ``sites`` under ``arrays``, each computed here from its data, pooled."""
    parts = bring_up(cfg, 2)
    set_adapter_arrays(parts.model, arrays)
    sites = [simulated_site(cfg, i, 3).train for i in sites]
    kw = {"batch_size": cfg.batch_size, "max_length": cfg.max_length, "device": parts.device}
    return HeadStatistics.pooled(
        [HeadStatistics.of(head_inputs(parts.model, parts.tokenizer, ds, **kw), ds.labels, 2) for ds in sites]
    )


@pytest.mark.parametrize("server_round", [1, 2])
def test_the_shared_head_is_the_lda_head_of_the_sites_summed_statistics(
    fitted: RunState, server_round: int
) -> None:
    # Prepare: the round's averaged adapter (before its head was replaced) and what followed it
    run = RunFolder(Path(fitted.cfg.out_dir))
    averaged, _ = load_arrays(run.audit_server / aggregate_round_name(server_round))
    learned, _ = load_arrays(run.audit_server / head_stats_round_name(server_round))
    after = load_arrays(run.global_round(server_round + 1) if server_round < 2 else run.global_final)[0]
    w, b = head_indices(fitted.shared.model)

    # Execute
    by_hand = _pooled_by_hand(fitted.cfg, averaged)
    limit = fitted.cfg.secagg_clipping_range / 2
    weight, bias = solve_lda(HeadStatistics.from_arrays(learned, 1), fitted.cfg.head_fit_shrinkage, limit)

    # Assert: the coordinator learned the pooled statistics (up to SecAgg+'s quantisation), solved its
    # head from them within half the clipping range, and changed nothing else
    pooled = HeadStatistics.from_arrays(learned, 1)
    np.testing.assert_allclose(pooled.second_moment, by_hand.second_moment, atol=1e-4)
    np.testing.assert_allclose(pooled.cross_moment, by_hand.cross_moment, atol=1e-4)
    np.testing.assert_allclose(after[w], weight, atol=1e-5)
    np.testing.assert_allclose(after[b], bias, atol=1e-5)
    assert max(np.abs(after[w]).max(), np.abs(after[b]).max()) == pytest.approx(limit)  # scaled to fit
    assert not np.allclose(after[w], averaged[w], atol=1e-3)
    for i, (a, c) in enumerate(zip(after, averaged, strict=True)):
        if i not in (w, b):
            np.testing.assert_array_equal(a, c)


def test_each_site_sends_its_statistics_apart_from_its_update_and_the_audit_accepts_them(
    fitted: RunState,
) -> None:
    # Prepare
    run = RunFolder(Path(fitted.cfg.out_dir))
    nodes = sorted(
        int(p.stem.rsplit("-", 1)[1]) for p in run.audit_server.glob("received-round-001-node-*.npz")
    )

    # Execute
    report = build_report(run.root)

    # Assert: per round and site, the update and the statistics are separate files, the site's own too
    assert len(nodes) == 3
    for r in (1, 2):
        for node in nodes:
            assert (run.audit_server / received_round_name(r, node, "head-stats")).is_file()
            assert (run.audit_server / received_round_name(r, node, HEAD_MOMENTS_LABEL)).is_file()
    for site in run.audit_sites.glob("site-*"):
        stats, scalars = load_arrays(site / head_stats_round_name(2))
        # 17 * 18 / 2 values of x x^T, then x y^T, then the frame's centre and scale
        assert [a.shape for a in stats] == [(153,), (17, 2), (16,), (16,)] and scalars["num_examples"] > 0
        moments, _ = load_arrays(site / head_stats_round_name(2, HEAD_MOMENTS_LABEL))
        assert [a.shape for a in moments] == [(16,), (16,)]
        # the adapter a site keeps for round 2 is the one it trained from, not the statistics request's
        received = load_arrays(site / global_round_name(2))[0]
        for a, b in zip(received, load_arrays(run.global_round(2))[0], strict=True):
            np.testing.assert_array_equal(a, b)
    assert report["only_adapter_left_sites"] and report["head_statistics_shapes"] == [[153], [17, 2]]
    assert report["head_moments_shapes"] == [[16], [16]]
    assert report["secagg"]["masked"] and report["secagg"]["aggregate_within_bound"]
    assert fitted.rounds.records[-1].macro_f1 is not None


def test_without_statistics_the_round_keeps_its_averaged_head(
    tmp_path: Path, tiny_base_model: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import fedtune.client.site

    # Prepare: plain aggregation, one round; every site fails to compute its statistics
    cfg = fast_config(
        tmp_path, tiny_base_model, head_fit="lda", audit=True, num_server_rounds=1, secure_aggregation=False
    )

    def fail(*args: object, **kwargs: object) -> None:
        raise RuntimeError("no statistics here")

    monkeypatch.setattr(fedtune.client.site, "site_statistics", fail)

    # Execute
    state = run_federation(cfg)

    # Assert: the round is kept, with the sites' averaged head, and a warning says so
    run = RunFolder(Path(cfg.out_dir))
    assert not (run.audit_server / aggregate_round_name(1)).exists()
    assert [r.round for r in state.rounds.records] == [0, 1]
    assert "no head statistics arrived; the shared head stays the sites' average" in caplog.text


def test_only_the_sites_in_the_aggregate_are_asked_for_statistics(
    tmp_path: Path, tiny_base_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fedtune.client.site
    from fedtune.common import instructions
    from local_grid import local_grid

    # Prepare: plain aggregation, one round; site 0 fails to train (it drops out of the aggregate)
    cfg = fast_config(
        tmp_path, tiny_base_model, head_fit="lda", num_server_rounds=1, audit=True, secure_aggregation=False
    )
    first_text = simulated_site(cfg, 0, 3).train.texts[0]
    train = fedtune.client.site.train_local

    def train_unless_site_0(model, tokenizer, ds, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if ds.texts[0] == first_text:
            raise RuntimeError("site 0 fails to train")
        return train(model, tokenizer, ds, *args, **kwargs)

    monkeypatch.setattr(fedtune.client.site, "train_local", train_unless_site_0)
    grid = local_grid(cfg)

    # Execute
    state = run_federation(cfg, grid=grid)

    # Assert: the two sites in the aggregate were asked, site 0 (node 101) was not
    asked = [
        m.metadata.dst_node_id
        for m in grid.delivered
        if m.metadata.message_type == "train"
        and m.content.config_records.get("fitins.config", {}).get(instructions.HEAD_STATS)
    ]
    assert sorted(asked) == [102, 103]
    assert list(state.rounds.records[1].excluded_sites) == ["101"]
    # and the coordinator learned their example-weighted mean, averaged in the clear
    run = RunFolder(Path(cfg.out_dir))
    learned, _ = load_arrays(run.audit_server / head_stats_round_name(1))
    by_hand = _pooled_by_hand(cfg, load_arrays(run.audit_server / aggregate_round_name(1))[0], (1, 2))
    pooled = HeadStatistics.from_arrays(learned, 1)
    np.testing.assert_allclose(pooled.second_moment, by_hand.second_moment, atol=1e-6)
    np.testing.assert_allclose(pooled.cross_moment, by_hand.cross_moment, atol=1e-6)


def test_under_secagg_the_sites_send_their_statistics_in_the_frame_of_their_pooled_moments(
    fitted: RunState,
) -> None:
    from fedtune.common.head_fit import FeatureMoments, StatisticsFrame

    # Prepare: what each site sent in round 2, its moments and its statistics with the frame it got
    run = RunFolder(Path(fitted.cfg.out_dir))
    sites = sorted(run.audit_sites.glob("site-*"))
    sent = [load_arrays(site / head_stats_round_name(2)) for site in sites]
    moments = [load_arrays(site / head_stats_round_name(2, HEAD_MOMENTS_LABEL))[0] for site in sites]
    frames = [StatisticsFrame(centre=a[2], scale=a[3]) for a, _ in sent]

    # Execute: the example-weighted means of what the sites sent (what SecAgg+ let the coordinator learn)
    weights = [scalars["num_examples"] for _, scalars in sent]
    in_frame = HeadStatistics.pooled(
        [HeadStatistics.from_arrays(a[:2], n) for (a, _), n in zip(sent, weights, strict=True)]
    )
    mean = np.average([m[0] for m in moments], axis=0, weights=weights)
    learned_moments, scalars = load_arrays(run.audit_server / head_stats_round_name(2, HEAD_MOMENTS_LABEL))

    # Assert: every site got the one frame, centred on the pooled mean the coordinator learned; in it
    # the features are centred; mapped back, the statistics are those the coordinator solved from, and
    # those of the features themselves
    for frame in frames[1:]:
        np.testing.assert_array_equal(frame.centre, frames[0].centre)
        np.testing.assert_array_equal(frame.scale, frames[0].scale)
    pooled_moments = FeatureMoments.from_arrays(learned_moments, scalars["examples"])
    np.testing.assert_allclose(frames[0].centre, pooled_moments.mean)
    # (SecAgg+ rounds each site's values to steps of 4 / 2^22 ~ 1e-6)
    np.testing.assert_allclose(pooled_moments.mean, mean, atol=1e-5)
    np.testing.assert_allclose(in_frame.second_moment[:-1, -1], 0.0, atol=2e-3)
    learned = HeadStatistics.from_arrays(load_arrays(run.audit_server / head_stats_round_name(2))[0], 1)
    back = frames[0].undo(in_frame)
    np.testing.assert_allclose(learned.second_moment, back.second_moment, atol=1e-5)
    np.testing.assert_allclose(learned.cross_moment, back.cross_moment, atol=1e-5)
    averaged, _ = load_arrays(run.audit_server / aggregate_round_name(2))
    by_hand = _pooled_by_hand(fitted.cfg, averaged)
    np.testing.assert_allclose(back.second_moment, by_hand.second_moment, atol=1e-5)


def test_when_no_statistics_arrive_in_the_frame_the_round_keeps_its_averaged_head(
    tmp_path: Path, tiny_base_model: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import fedtune.client.site

    # Prepare: SecAgg+, one round; the sites send their moments, then fail to compute their statistics
    cfg = fast_config(
        tmp_path, tiny_base_model, head_fit="lda", audit=True, num_server_rounds=1, secagg_clipping_range=2.0
    )

    def fail(*args: object, **kwargs: object) -> None:
        raise RuntimeError("no statistics here")

    monkeypatch.setattr(fedtune.client.site, "site_statistics", fail)

    # Execute
    state = run_federation(cfg)

    # Assert: the moments arrived; the round is kept with the sites' averaged head, and a warning says so
    run = RunFolder(Path(cfg.out_dir))
    assert (run.audit_server / head_stats_round_name(1, HEAD_MOMENTS_LABEL)).is_file()
    assert not (run.audit_server / head_stats_round_name(1)).exists()
    assert [r.round for r in state.rounds.records] == [0, 1]
    assert "no head statistics arrived; the shared head stays the sites' average" in caplog.text
