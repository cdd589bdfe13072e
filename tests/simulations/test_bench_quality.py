"""``fedtune bench quality``: the fair protocol's choices, targets, saved arms and local-only arm."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fedtune.simulations.benchmarks import quality as bench_quality
from fedtune.simulations.benchmarks.quality_report import arm_summaries, grids, plot, report
from fedtune.simulations.benchmarks.spec import Outcome


def _curve(*points: tuple[float, float]) -> dict[str, Any]:
    """A saved curve arm: one ``(validation, held-out)`` macro-F1 pair per round, from round 1."""
    return {
        "curve": [
            {"step": i, "val_macro_f1": v, "val_accuracy": v, "test_macro_f1": t, "test_accuracy": t + 0.5}
            for i, (v, t) in enumerate(points, start=1)
        ]
    }


def _site(best: int, f1_best: float, f1_budget: float) -> dict[str, Any]:
    return {
        "best": best,
        "test_f1_best": f1_best,
        "test_acc_best": f1_best + 0.5,
        "test_f1_budget": f1_budget,
        "test_acc_budget": f1_budget + 0.5,
    }


def test_each_arm_chooses_its_setting_on_validation_separately_at_each_point() -> None:
    # Prepare: "a" has the best validation peak (epoch 3), "b" the better validation at the budget
    # (epoch 2); the held-out set would choose the other way round both times. Federated: "s1"
    # peaks higher on validation, "s2" on the held-out set.
    arms = {
        "fedavg-s1": _curve((0.1, 0.2), (0.3, 0.25), (0.2, 0.4)),
        "fedavg-s2": _curve((0.1, 0.2), (0.25, 0.6), (0.2, 0.7)),
        "fedavg-unlisted": _curve((0.9, 0.9), (0.9, 0.9), (0.9, 0.9)),
        "centralized-a": _curve((0.1, 0.7), (0.3, 0.35), (0.5, 0.4)),
        "centralized-b": _curve((0.45, 0.6), (0.4, 0.2), (0.1, 0.9)),
        "local": {"sites": [_site(1, 0.1, 0.05), _site(3, 0.3, 0.15)]},
    }
    grids = {"fedavg": ["s1", "s2"], "centralized": ["a", "b"]}

    # Execute
    judged = arm_summaries(arms, budget=2, grids=grids)

    # Assert: federated at its own validation peak (setting s1, round 2), not its held-out peak
    fed = judged["fedavg"]
    assert (fed["setting_best"], fed["best"], fed["test_f1_best"]) == ("s1", 2, 0.25)
    assert (fed["setting_budget"], fed["test_f1_budget"]) == ("s1", 0.25)
    central = judged["centralized"]
    assert (central["setting_best"], central["best"], central["test_f1_best"]) == ("a", 3, 0.4)
    assert (central["setting_budget"], central["test_f1_budget"]) == ("b", 0.2)
    # the averaged reading follows the best-point choice ("a": epochs 2-3), not the budget's ("b")
    assert central["test_f1_late"] == pytest.approx(0.375)
    assert judged["local-mean"]["test_f1_best"] == pytest.approx(0.2)
    assert judged["local-mean"]["test_f1_budget"] == pytest.approx(0.1)
    assert judged["local-best"]["test_f1_best"] == 0.3 and judged["local-best"]["best"] == 3
    assert set(judged) == {"fedavg", "centralized", "local-mean", "local-best"}


def test_grids_name_every_strategy_and_centralized() -> None:
    s = {"strategies": ["fedavg", "fedavgm"], "federated": ["s1"], "central": ["a", "b"]}
    assert grids(s) == {"fedavg": ["s1"], "fedavgm": ["s1"], "centralized": ["a", "b"]}


def _settings(**overrides: Any) -> dict[str, Any]:
    s = bench_quality.settings(quick=False)
    s.update(max_rounds=3, budget=2, central=["a"], federated=["x"], strategies=["fedavg"], seeds=[42, 43])
    s["protocol"] = {"max_rounds": 50, "max_epochs": 20, "seeds": 3}
    return {**s, **overrides}


def test_report_judges_each_target_on_the_mean_over_seeds(tmp_path: Path, monkeypatch) -> None:
    # Prepare: two seeds at Dirichlet 0.3; federated peaks at its last round in seed 43
    monkeypatch.chdir(tmp_path)
    per_seed = {
        "dirichlet-0.3": {
            42: {
                "fedavg-x": _curve((0.1, 0.2), (0.3, 0.30), (0.2, 0.1)),
                "centralized-a": _curve((0.2, 0.3), (0.4, 0.36), (0.5, 0.34)),
                "local": {"sites": [_site(1, 0.05, 0.05), _site(2, 0.15, 0.10)]},
            },
            43: {
                "fedavg-x": _curve((0.1, 0.2), (0.3, 0.30), (0.4, 0.32)),
                "centralized-a": _curve((0.2, 0.3), (0.4, 0.36), (0.5, 0.38)),
                "local": {"sites": [_site(1, 0.05, 0.05), _site(2, 0.15, 0.10)]},
            },
        }
    }

    # Execute
    rows, notes = report(per_seed, _settings())

    # Assert: rows are means ± std over both seeds, in the order the arms were saved
    by_arm = {r["arm"]: r for r in rows}
    assert list(by_arm) == ["fedavg", "centralized", "local-mean", "local-best"]
    assert by_arm["fedavg"]["macro_f1_best_mean"] == pytest.approx(0.31)
    assert by_arm["fedavg"]["best"] == 2.5 and by_arm["fedavg"]["seeds"] == 2
    assert by_arm["centralized"]["macro_f1_budget_mean"] == pytest.approx(0.36)
    assert by_arm["centralized"]["settings"] == ["a"] and by_arm["fedavg"]["settings"] == ["x"]
    # Assert: gap 36 - 31 = 5 > 3; lift 31 - 10 = 21 >= 10; budget 30 / 36 = 83% >= 80%
    assert notes[1] == "Protocol cut to fit the machine: federated rounds 3 of 50; 2 seed(s) of 3."
    target = notes[2]
    assert target.startswith("dirichlet-0.3, fedavg (x): macro-F1 at the best validation point 31.0")
    assert "gap +5.0 points (target <= 3: missed)" in target
    assert "mean local-only site 10.0, lift +21.0 (target >= 10: met)" in target
    assert "30.0 vs centralized after 2 epochs 36.0 = 83% (target >= 80%: met)" in target
    # Assert: held-out means over rounds (epochs) 2-3: federated (0.2 + 0.31) / 2, centralized 0.36
    late = "(rounds 2-3, epochs 2-20; no single validation pick decides it): 25.5 vs 36.0, gap +10.5 points."
    assert late in target
    # Assert: seed 42's gap 34 - 30, seed 43's 38 - 32; standard error std(4, 6) / sqrt(2) = 1.0
    paired = "Seed by seed (42, 43): gap +4.0, +6.0 points; standard error of the mean gap 1.0 points."
    assert paired in target
    assert target.endswith("still rising at round 3.")

    # Execute: the benchmark's plot of the same outcome
    plot(Outcome(rows, notes, {"per_seed": per_seed}), _settings())

    # Assert
    assert (tmp_path / "results" / "quality_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "results" / "quality_macro_f1.png").is_file()


def test_partitions_without_a_gap_target_are_reported_without_a_verdict(tmp_path: Path, monkeypatch) -> None:
    # Prepare
    monkeypatch.chdir(tmp_path)
    per_seed = {"dirichlet-1.0": {42: {"fedavg-x": _curve((0.3, 0.3)), "centralized-a": _curve((0.3, 0.4))}}}

    # Execute
    _, notes = report(per_seed, _settings(max_rounds=5, budget=1, seeds=[42, 43, 44]))

    # Assert: no cut (rounds under the protocol's are the only ones named), a gap but no target
    assert notes[1].startswith("Protocol cut to fit the machine: federated rounds 5 of 50.")
    assert "gap +10.0 points." in notes[2] and "target <= " not in notes[2].split("At the budget")[0]


def test_the_seed_by_seed_gap_pairs_only_the_seeds_both_sides_have(tmp_path: Path, monkeypatch) -> None:
    # Prepare: federated in seeds 42-44, centralized in 42 and 44 only; seed 43's federated would
    # give a gap of +30 if it were paired with another seed's centralized run
    monkeypatch.chdir(tmp_path)
    fed = {42: 0.30, 43: 0.10, 44: 0.36}
    central = {42: 0.40, 44: 0.42}
    per_seed = {
        "dirichlet-0.3": {
            seed: {
                "fedavg-x": _curve((0.3, f1)),
                **({"centralized-a": _curve((0.3, central[seed]))} if seed in central else {}),
            }
            for seed, f1 in fed.items()
        }
    }

    # Execute
    _, notes = report(per_seed, _settings(max_rounds=5, budget=1, seeds=[42, 43, 44]))
    _, one_seed = report({"dirichlet-0.3": {42: per_seed["dirichlet-0.3"][42]}}, _settings(budget=1))

    # Assert: gaps 40 - 30 and 42 - 36; standard error std(10, 6) / sqrt(2) = 2.0; no spread of one seed
    paired = "Seed by seed (42, 44): gap +10.0, +6.0 points; standard error of the mean gap 2.0 points."
    assert paired in notes[2]
    assert "gap +10.0 points" in one_seed[-1] and "Seed by seed" not in one_seed[-1]


def test_shortened_protocol_is_checked_against_the_budget(monkeypatch) -> None:
    # Prepare
    monkeypatch.setenv("FEDTUNE_BENCH_MAX_ROUNDS", "4")

    # Execute / Assert: fewer rounds than the default budget cannot judge it
    with pytest.raises(
        ValueError, match=r"\$FEDTUNE_BENCH_MAX_ROUNDS=4: must be at least the default budget, 5"
    ):
        bench_quality.chosen_settings(quick=False)
    monkeypatch.setenv("FEDTUNE_BENCH_MAX_ROUNDS", "20")
    monkeypatch.setenv("FEDTUNE_BENCH_CENTRAL", "lr2e-3-la")
    s = bench_quality.chosen_settings(quick=False)
    assert (s["max_rounds"], s["max_epochs"], s["central"]) == (20, 20, ["lr2e-3-la"])
    monkeypatch.setenv("FEDTUNE_BENCH_FEDERATED", "s10-lr5e-3")
    assert bench_quality.chosen_settings(quick=False)["federated"] == ["s10-lr5e-3"]
    monkeypatch.setenv("FEDTUNE_BENCH_FEDERATED", "s5")
    with pytest.raises(ValueError, match="FEDTUNE_BENCH_FEDERATED: unknown s5"):
        bench_quality.chosen_settings(quick=False)
    monkeypatch.delenv("FEDTUNE_BENCH_FEDERATED")
    monkeypatch.setenv("FEDTUNE_BENCH_CENTRAL", "lr1")
    with pytest.raises(ValueError, match="FEDTUNE_BENCH_CENTRAL: unknown lr1"):
        bench_quality.chosen_settings(quick=False)


def test_saved_only_assembles_the_saved_arms_and_lists_the_rest(tmp_path: Path, monkeypatch) -> None:
    # Prepare: the quick grid computed once with stand-in arms
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FEDTUNE_BENCH_RESUME", "1")
    calls: list[str] = []

    def fed(bench: str, label: str, config: dict, sites: int) -> dict:
        calls.append(label)
        assert config["audit"] == "true" and config["num-server-rounds"] == 3 and sites == 3
        assert (config["local-steps"], config["learning-rate"]) == (30, 5e-3)
        return _curve((0.1, 0.2), (0.2, 0.3), (0.15, 0.35))

    monkeypatch.setattr(bench_quality, "federated_curve", fed)
    monkeypatch.setattr(
        bench_quality, "centralized_curve", lambda *a: _curve((0.3, 0.4), (0.4, 0.5), (0.3, 0.6))
    )
    monkeypatch.setattr(bench_quality, "local_only", lambda *a: {"sites": [_site(1, 0.1, 0.1)]})
    bench_quality.BENCHMARK.run(True)
    bench_quality.BENCHMARK.run(True)  # resumed: nothing recomputed
    assert calls == ["dirichlet-0.3-seed42-fedavg-s30-lr5e-3"]
    (tmp_path / "results" / "arms" / "quality" / "dirichlet-0.3-seed42-local.json").unlink()

    # Execute: assemble from saved arms only; computing anything would fail
    def must_not_run(*a: object, **k: object) -> None:
        raise AssertionError("an arm was computed")

    for name in ("federated_curve", "centralized_curve", "local_only"):
        monkeypatch.setattr(bench_quality, name, must_not_run)
    monkeypatch.setenv("FEDTUNE_BENCH_SAVED_ONLY", "1")
    data = json.loads(bench_quality.BENCHMARK.run(True).read_text())

    # Assert
    assert data["missing"] == ["dirichlet-0.3-seed42-local"]
    assert [r["arm"] for r in data["rows"]] == ["fedavg", "centralized"]
    assert data["rows"][0]["macro_f1_best"] == "0.300 ± 0.000" and data["rows"][0]["best"] == 2
    assert data["notes"][-1] == "Not run yet (assembled from saved arms only): dirichlet-0.3-seed42-local."
    assert "FEDTUNE_BENCH_SAVED_ONLY=1" in data["command"]


@pytest.mark.usefixtures("one_torch_thread")
def test_local_only_site_keeps_its_adapter_across_rounds_and_is_scored_at_its_chosen_rounds(
    tiny_base_model: Path,
) -> None:
    from fedtune.common.config import parse_run_config
    from fedtune.common.model import bring_up, load_tokenizer, select_device
    from fedtune.common.sites import coordinator_test_set, simulated_site
    from fedtune.common.train import evaluate, train_local

    # Prepare: the Pima table over 2 sites, 3 local steps of batch 16 per round
    run_config = {
        "task": "diabetes",
        "base-model": str(tiny_base_model),
        "batch-size": 16,
        "local-steps": 6,
        "learning-rate": 0.05,
    }
    cfg = parse_run_config(run_config)
    tokenizer, device = load_tokenizer(tiny_base_model), select_device("cpu")
    test = coordinator_test_set(cfg)

    # Execute: 3 rounds, judged at round 2 (a snapshot the site has trained past) and at its best
    result = bench_quality.local_only(run_config, sites=2, rounds=3, budget=2)

    # Assert: site 1 replayed by hand: one adapter trained round after round, judged on its own split
    site = simulated_site(cfg, 1, 2)
    model = bring_up(cfg, len(test.label_names)).model
    val, held_out, losses = [], [], []
    for r in (1, 2, 3):
        train_local(model, tokenizer, site.train, cfg, device=device, seed=cfg.seed + r, server_round=r)
        scored = [
            evaluate(model, tokenizer, ds, batch_size=16, max_length=cfg.max_length, device=device)
            for ds in (site.test, test)
        ]
        val.append(scored[0].macro_f1)
        held_out.append(scored[1].macro_f1)
        losses.append(scored[1].loss)
    got = result["sites"][1]
    assert [p["val_macro_f1"] for p in got["curve"]] == pytest.approx(val)
    assert got["best"] == 1 + max(range(3), key=lambda i: val[i])
    assert (got["test_f1_budget"], got["test_loss_budget"]) == pytest.approx((held_out[1], losses[1]))
    assert (got["test_f1_best"], got["test_loss_best"]) == pytest.approx(
        (held_out[got["best"] - 1], losses[got["best"] - 1])
    )
    assert got["train_examples"] == len(site.train) and len(result["sites"]) == 2
    assert len(set(losses)) == 3  # every round differs, so a wrong snapshot would show


@pytest.mark.e2e
def test_bench_quality_quick_runs_every_arm_on_real_data(tmp_path: Path) -> None:
    import subprocess
    import sys

    # Execute
    proc = subprocess.run(
        [sys.executable, "-m", "fedtune.simulations.cli", "bench", "quality", "--quick"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=1200,
    )

    # Assert: a point per round (epoch) for every arm, each local site judged, the curves plotted
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "results" / "quality.json").read_text())
    arms = data["per_seed"]["dirichlet-0.3"]["42"]
    assert [p["step"] for p in arms["fedavg-s30-lr5e-3"]["curve"]] == [1, 2, 3]
    assert [p["step"] for p in arms["centralized-lr5e-3"]["curve"]] == [1, 2, 3]
    assert len(arms["local"]["sites"]) == 3 and all(len(x["curve"]) == 3 for x in arms["local"]["sites"])
    assert [r["arm"] for r in data["rows"]] == ["fedavg", "centralized", "local-mean", "local-best"]
    records = json.loads(
        (
            tmp_path
            / "results"
            / "work"
            / "quality"
            / "dirichlet-0.3-seed42-fedavg-s30-lr5e-3"
            / "metrics.json"
        ).read_text()
    )
    assert [p["test_macro_f1"] for p in arms["fedavg-s30-lr5e-3"]["curve"]] == [
        r["macro_f1"] for r in records[1:]
    ]
    assert (tmp_path / "results" / "quality_curves.png").read_bytes()[:4] == b"\x89PNG"


def test_a_centralized_run_that_solved_its_head_offers_its_trained_head_too() -> None:
    # Prepare: the solved head peaks higher on validation; the trained head is better at the budget
    run = _curve((0.2, 0.2), (0.5, 0.45), (0.4, 0.5))
    run["trained_head_curve"] = _curve((0.1, 0.1), (0.6, 0.3), (0.3, 0.7))["curve"]
    run["curve"] = _curve((0.2, 0.2), (0.5, 0.45), (0.7, 0.5))["curve"]
    arms = {"centralized-a": run}

    # Execute
    judged = arm_summaries(arms, budget=2, grids={"centralized": ["a"]})["centralized"]

    # Assert: each point chooses between the two heads of the one run on validation
    assert (judged["setting_best"], judged["best"], judged["test_f1_best"]) == ("a", 3, 0.5)
    assert (judged["setting_budget"], judged["test_f1_budget"]) == ("a-trained-head", 0.3)


def test_local_only_arms_can_be_left_out_and_the_cut_is_named(monkeypatch) -> None:
    from fedtune.simulations.benchmarks.quality_report import protocol_cut

    # Prepare
    s = bench_quality.chosen_settings(quick=True)
    base = bench_quality._base_config(s, "dirichlet-0.3", 42)
    assert "local" in bench_quality._arm_plan(s, "dirichlet-0.3", 42, base) and protocol_cut(s) == []

    # Execute
    monkeypatch.setenv("FEDTUNE_BENCH_LOCAL", "0")
    s = bench_quality.chosen_settings(quick=True)

    # Assert
    assert list(bench_quality._arm_plan(s, "dirichlet-0.3", 42, base)) == [
        "fedavg-s30-lr5e-3",
        "centralized-lr5e-3",
    ]
    assert protocol_cut(s) == [
        "Protocol cut to fit the machine: the local-only arms left out ($FEDTUNE_BENCH_LOCAL=0)."
    ]
    monkeypatch.setenv("FEDTUNE_BENCH_LOCAL", "no")
    with pytest.raises(ValueError, match=r"\$FEDTUNE_BENCH_LOCAL='no': must be 1 .* or 0"):
        bench_quality.chosen_settings(quick=True)


@pytest.mark.usefixtures("one_torch_thread")
def test_a_centralized_run_that_solves_its_head_scores_the_pooled_lda_head_and_trains_as_before(
    tiny_base_model: Path,
) -> None:
    from fedtune.common.config import parse_run_config
    from fedtune.common.model import bring_up
    from fedtune.simulations.benchmarks.curves import SHRINKAGES, centralized_curve, sets, solved_head_scores
    from fedtune.simulations.benchmarks.training import train_central

    # Prepare: the Pima table over 2 sites, trained 2 epochs with and without a solved head
    run_config = {
        "task": "diabetes",
        "base-model": str(tiny_base_model),
        "batch-size": 16,
        "head-fit": "none",
    }
    plain = centralized_curve(run_config, 2, 2)

    # Execute
    solving = centralized_curve({**run_config, "head-fit": "lda"}, 2, 2)

    # Assert: the same training (the trained head's curve is the plain run's) ...
    assert "trained_head_curve" not in plain
    assert solving["trained_head_curve"] == pytest.approx(plain["curve"])
    # ... scored with the LDA head of the pooled training data, replayed by hand after epoch 2
    cfg = parse_run_config({**run_config, "head-fit": "lda"})
    pool, validation, test = sets(cfg, 2)
    parts = bring_up(cfg, len(pool.label_names))
    train_central(cfg, parts, pool, epochs=2)
    expected = solved_head_scores(cfg, parts, [pool], validation, test)
    last = solving["curve"][-1]
    assert last["step"] == 2 and last["shrinkage"] == expected["shrinkage"] in SHRINKAGES
    assert (last["val_macro_f1"], last["test_macro_f1"]) == pytest.approx(
        (expected["val"]["macro_f1"], expected["test"]["macro_f1"])
    )
    assert last["test_macro_f1"] != pytest.approx(solving["trained_head_curve"][-1]["test_macro_f1"])


@pytest.mark.usefixtures("one_torch_thread")
def test_a_solved_heads_shrinkage_is_chosen_on_validation_not_on_the_held_out_set(
    tiny_base_model: Path, monkeypatch
) -> None:
    import numpy as np
    from fedtune.common import head_fit
    from fedtune.common.config import parse_run_config
    from fedtune.common.model import bring_up
    from fedtune.simulations.benchmarks.curves import sets, solved_head_scores

    # Prepare: a stand-in solve whose head predicts class 1 at shrinkage 0.3 and class 0 otherwise;
    # validation holds only class 1, the held-out set only class 0
    def solve(stats: head_fit.HeadStatistics, shrinkage: float) -> tuple[np.ndarray, np.ndarray]:
        d = stats.second_moment.shape[0] - 1
        return np.zeros((2, d)), np.array([0.0, 1.0]) * (1 if shrinkage == 0.3 else -1)

    monkeypatch.setattr(head_fit, "solve_lda", solve)
    cfg = parse_run_config({"task": "diabetes", "base-model": str(tiny_base_model), "max-length": 32})
    pool, validation, test = sets(cfg, 2)
    parts = bring_up(cfg, 2)
    ones, zeros = (
        validation.subset(np.flatnonzero(validation.labels == 1)),
        test.subset(np.flatnonzero(test.labels == 0)),
    )

    # Execute
    got = solved_head_scores(cfg, parts, [pool], ones, zeros)

    # Assert: validation's choice, scored on both sets
    assert got["shrinkage"] == 0.3
    assert got["val"]["accuracy"] == 1.0 and got["test"]["accuracy"] == 0.0


def test_centralized_and_local_arms_are_saved_under_one_key_whatever_the_federations_rounds() -> None:
    # Prepare
    s5, s10 = (_settings(max_rounds=n, central=["lr5e-3"], federated=["s30-lr5e-3"]) for n in (5, 10))

    def keys(s: dict[str, Any]) -> dict[str, Any]:
        base = bench_quality._base_config(s, "dirichlet-0.3", 42)
        return {
            arm: key for arm, (_, key, _) in bench_quality._arm_plan(s, "dirichlet-0.3", 42, base).items()
        }

    # Execute
    k5, k10 = keys(s5), keys(s10)

    # Assert: the centralized arm's key holds no rounds, a site alone its own; the federated arm's
    # holds the federation's
    assert k5["centralized-lr5e-3"] == k10["centralized-lr5e-3"]
    assert k5["local"] == k10["local"] and k5["local"]["config"]["num-server-rounds"] == s5["local_rounds"]
    assert "num-server-rounds" not in k5["centralized-lr5e-3"]["config"]
    rounds = [k["fedavg-s30-lr5e-3"]["config"]["num-server-rounds"] for k in (k5, k10)]
    assert rounds == [5, 10]
