"""``fedtune bench``: registry and CLI errors, BENCHMARKS.md assembly, pure helpers; one e2e quick run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fedtune.common.config import parse_run_config
from fedtune.common.records import RoundRecord
from fedtune.common.sites import simulated_site
from fedtune.common.train import score
from fedtune.simulations.benchmarks import BENCHMARKS, get_benchmark, training
from fedtune.simulations.benchmarks import curves as bench_curves
from fedtune.simulations.benchmarks import llm as bench_llm
from fedtune.simulations.benchmarks import tuning as bench_tuning
from fedtune.simulations.benchmarks.arms import cached, choose, env_list
from fedtune.simulations.benchmarks.data import feature_value, skewed_split
from fedtune.simulations.benchmarks.report import collect
from fedtune.simulations.benchmarks.secagg import cost_per_site, max_abs_difference
from fedtune.simulations.benchmarks.stats import bootstrap_auc_ci, mean_std
from fedtune.simulations.cli import main
from sklearn.metrics import roc_auc_score

ALL = [
    *("quality", "rounds", "tuning", "head", "diabetes", "methods", "comm"),
    *("secagg", "overhead", "scale", "privacy", "llm", "deploy"),
]


def test_registry_names_every_benchmark_and_each_module_declares_it() -> None:
    # Assert
    assert list(BENCHMARKS) == ALL
    for name in ALL:
        module = __import__(f"fedtune.simulations.benchmarks.{name}", fromlist=["BENCHMARK"])
        bench = module.BENCHMARK
        assert bench.name == name and bench.columns
        for quick in (True, False):
            assert isinstance(bench.settings(quick), dict)


def test_unknown_benchmark_is_an_error_listing_the_valid_ones() -> None:
    # Execute / Assert
    with pytest.raises(KeyError, match="valid: " + ", ".join(ALL)):
        get_benchmark("nope")


def test_cli_unknown_benchmark_exits_2_and_lists_valid_names(capsys) -> None:
    # Execute
    rc = main(["bench", "nope", "--quick"])

    # Assert
    assert rc == 2
    err = capsys.readouterr().err
    assert "Unknown benchmark 'nope'" in err and ", ".join(ALL) in err and "report" in err


def test_cli_bench_report_writes_benchmarks_md(tmp_path: Path, monkeypatch, capsys) -> None:
    # Prepare
    monkeypatch.chdir(tmp_path)

    # Execute
    rc = main(["bench", "report"])

    # Assert
    assert rc == 0
    assert (tmp_path / "BENCHMARKS.md").read_text().startswith("# Benchmarks")


def _fake_results(results: Path, name: str, quick: bool) -> None:
    results.mkdir(parents=True, exist_ok=True)
    command = f"fedtune bench {name}" + (" --quick" if quick else "")
    (results / f"{name}.json").write_text(json.dumps({"benchmark": name, "command": command, "quick": quick}))
    (results / f"{name}.md").write_text(
        f"## {name}\n\nrun on X.\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n- a note\n"
    )
    for suffix in ("bytes", "alpha"):
        (results / f"{name}_{suffix}.png").write_bytes(b"\x89PNG")


def test_collect_assembles_every_benchmark_with_command_table_and_plots(tmp_path: Path) -> None:
    # Prepare
    results = tmp_path / "results"
    _fake_results(results, "comm", quick=True)
    _fake_results(results, "secagg", quick=False)
    (results / "unrelated_plot.png").write_bytes(b"\x89PNG")

    # Execute
    out = collect(results, tmp_path / "BENCHMARKS.md")

    # Assert
    text = out.read_text()
    assert text.startswith("# Benchmarks")
    for name in ALL:  # every benchmark has a section, in registry order
        assert f"\n## {name}\n" in text
    positions = [text.index(f"\n## {name}\n") for name in ALL]
    assert positions == sorted(positions)
    assert "```bash\nfedtune bench comm --quick\n```" in text
    assert "```bash\nfedtune bench secagg\n```" in text
    assert "| 1 | 2 |" in text and "- a note" in text
    assert (
        "![comm: alpha](results/comm_alpha.png)" in text and "![comm: bytes](results/comm_bytes.png)" in text
    )
    assert "unrelated_plot" not in text
    assert text.count("Quick validation run") == 1  # comm only
    assert "Not run yet: `fedtune bench quality`." in text
    assert text.count("## comm") == 1  # the md's own heading is not repeated


def test_collect_links_plots_relative_to_the_output_file(tmp_path: Path) -> None:
    # Prepare
    _fake_results(tmp_path / "results", "scale", quick=False)
    (tmp_path / "docs").mkdir()

    # Execute
    text = collect(tmp_path / "results", tmp_path / "docs" / "B.md").read_text()

    # Assert
    assert "](../results/scale_bytes.png)" in text


def test_bootstrap_auc_ci_brackets_the_auc_and_is_seeded() -> None:
    # Prepare
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 100)
    scores = labels + rng.normal(0, 1.0, 200)

    # Execute
    auc, low, high = bootstrap_auc_ci(labels, scores, resamples=1000, seed=0)
    again = bootstrap_auc_ci(labels, scores, resamples=1000, seed=0)

    # Assert
    assert auc == pytest.approx(roc_auc_score(labels, scores))
    assert low < auc < high and 0.05 < high - low < 0.3
    assert again == (auc, low, high)


def test_bootstrap_auc_ci_of_a_perfect_ranking_is_one_and_one_class_is_an_error() -> None:
    # Execute / Assert
    assert bootstrap_auc_ci(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.8, 0.9]), resamples=50) == (1, 1, 1)
    with pytest.raises(ValueError, match="both classes"):
        bootstrap_auc_ci(np.zeros(5, dtype=int), np.arange(5.0))


def test_skewed_split_cuts_contiguous_blocks_of_the_sorted_feature() -> None:
    # Prepare
    ages = [50, 21, 33, 60, 21, 45, 29]

    # Execute
    blocks = skewed_split(ages, 3)

    # Assert: a partition of every index, sizes differ by at most one, ages ascend block by block
    assert sorted(np.concatenate(blocks).tolist()) == list(range(len(ages)))
    assert [len(b) for b in blocks] == [3, 2, 2]
    values = [[ages[i] for i in b] for b in blocks]
    assert all(max(a) <= min(b) for a, b in zip(values, values[1:], strict=False))
    assert blocks[0].tolist() == [1, 4, 6]  # stable: the two 21s keep their order
    with pytest.raises(ValueError, match="num_sites"):
        skewed_split(ages, 8)


def test_feature_value_reads_a_serialised_row() -> None:
    # Prepare
    row = "Pregnancies: 6; Glucose: 148; BloodPressure: 72; DiabetesPedigreeFunction: 0.627; Age: 50"

    # Execute / Assert
    assert feature_value(row, "Age") == 50.0
    assert feature_value(row, "Glucose") == 148.0
    assert feature_value(row, "DiabetesPedigreeFunction") == 0.627
    with pytest.raises(ValueError, match="No `Insulin"):
        feature_value(row, "Insulin")


def test_mean_std_and_env_overrides(monkeypatch) -> None:
    # Execute / Assert
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(2**0.5))
    assert mean_std([0.5]) == (0.5, 0.0)
    monkeypatch.setenv("FEDTUNE_BENCH_SEEDS", "1, 2")
    assert env_list("FEDTUNE_BENCH_SEEDS", [42], int) == [1, 2]
    assert env_list("FEDTUNE_BENCH_UNSET", [42], int) == [42]
    monkeypatch.setenv("FEDTUNE_BENCH_SEEDS", "x")
    with pytest.raises(ValueError, match=r"\$FEDTUNE_BENCH_SEEDS"):
        env_list("FEDTUNE_BENCH_SEEDS", [42], int)
    with pytest.raises(ValueError, match="unknown dirichlet-0.5; valid: iid, specialty"):
        choose("FEDTUNE_BENCH_PARTITIONS", ["iid", "dirichlet-0.5"], ["iid", "specialty"])


def test_a_broken_saved_arm_is_named_and_nothing_is_left_half_written(tmp_path: Path, monkeypatch) -> None:
    # Prepare: an arm file cut short, as a crash while writing without a rename would leave it
    monkeypatch.setenv("FEDTUNE_BENCH_RESUME", "1")
    path = tmp_path / "arm.json"
    path.write_text('{"key": {"seed": 1}, "res')

    # Execute / Assert: the file and the fix are named; recomputing writes the whole entry, no temp file
    with pytest.raises(ValueError, match=rf"Saved arm {path} is not valid JSON .*delete it"):
        cached(path, {"seed": 1}, lambda: {"macro_f1": np.float32(0.25)})
    path.unlink()
    assert cached(path, {"seed": 1}, lambda: {"macro_f1": np.float32(0.25)}) == {"macro_f1": np.float32(0.25)}
    assert json.loads(path.read_text()) == {"key": {"seed": 1}, "result": {"macro_f1": 0.25}}
    assert [p.name for p in tmp_path.iterdir()] == ["arm.json"]


def test_results_record_the_arm_picking_variables_in_the_command(tmp_path: Path, monkeypatch) -> None:
    from fedtune.simulations.benchmarks import harness as benchmarking

    # Prepare: a subset of arms picked from the environment
    monkeypatch.setattr(benchmarking, "RESULTS", tmp_path)
    monkeypatch.setenv("FEDTUNE_BENCH_SEEDS", "43")
    monkeypatch.setenv("FEDTUNE_BENCH_PARTITIONS", "iid")
    monkeypatch.setenv("FEDTUNE_OTHER", "x")

    # Execute
    path = benchmarking.write_results("demo", [{"a": 1}], columns=["a"], quick=True)

    # Assert: a reader can rerun exactly this subset; other variables are left out
    command = "FEDTUNE_BENCH_PARTITIONS=iid FEDTUNE_BENCH_SEEDS=43 fedtune bench demo --quick"
    assert json.loads(path.read_text())["command"] == command
    assert f"`{command}`" in (tmp_path / "demo.md").read_text()


def test_cached_reuses_an_arm_only_when_resuming_with_the_same_key(tmp_path: Path, monkeypatch) -> None:
    # Prepare
    calls = []

    def compute() -> dict:
        calls.append(1)
        return {"macro_f1": 0.5}

    path = tmp_path / "arm.json"

    # Execute / Assert
    assert cached(path, {"seed": 1}, compute) == {"macro_f1": 0.5}
    cached(path, {"seed": 1}, compute)
    assert len(calls) == 2  # no resume: recomputed
    monkeypatch.setenv("FEDTUNE_BENCH_RESUME", "1")
    cached(path, {"seed": 1}, compute)
    assert len(calls) == 2  # reused
    cached(path, {"seed": 2}, compute)
    assert len(calls) == 3  # other settings: recomputed


def test_resolved_config_of_an_arm_holds_every_default_but_no_output_folder() -> None:
    from fedtune.common.config import FedConfig
    from fedtune.simulations.benchmarks.arms import resolved

    # Execute
    config = resolved({"strategy": "fedadam", "out-dir": "somewhere"})

    # Assert: a default that is not overridden is part of the key; the output folder is not
    assert config["fedopt-eta"] == FedConfig.fedopt_eta and config["strategy"] == "fedadam"
    assert config["learning-rate"] == FedConfig.learning_rate and "out-dir" not in config
    assert resolved({"fedopt-eta": 0.05}) != resolved({})


def test_max_abs_difference_of_adapters() -> None:
    # Prepare
    a = {"x": np.zeros((2, 2), np.float32), "y": np.ones(3, np.float32)}
    b = {"x": np.array([[0, 1e-3], [0, 0]], np.float32), "y": np.ones(3, np.float32)}

    # Execute / Assert
    assert max_abs_difference(a, b) == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="different tensors"):
        max_abs_difference(a, {"x": a["x"]})


def test_secagg_cost_per_site_recovers_the_slopes_and_the_limit_ratio() -> None:
    # Prepare: plain = 0.3 s/site + 0.5 s, SecAgg+ adds 0.03 s/site + 0.2 s
    rows = [
        {"sites": n, "plain_s_per_round": 0.3 * n + 0.5, "secagg_s_per_round": 0.33 * n + 0.7}
        for n in (5, 10, 20)
    ]

    # Execute
    (note,) = cost_per_site(rows)

    # Assert
    assert "plain 300 ms per site + 0.50 s" in note and "adds 30 ms per site + 0.20 s" in note
    assert "= 1.100x" in note
    assert cost_per_site(rows[:1]) == []


def test_diabetes_site_files_are_age_blocks_and_cover_the_pool(tmp_path: Path) -> None:
    from fedtune.simulations.benchmarks.diabetes import write_site_files

    # Execute
    files = write_site_files(tmp_path, 4)

    # Assert
    sites = files["sites"]
    assert len(sites) == 4
    assert all(a["age_max"] <= b["age_min"] for a, b in zip(sites, sites[1:], strict=False))
    pool_rows = len(Path(files["pool"]).read_text().splitlines()) - 1
    assert sum(s["rows"] for s in sites) == pool_rows
    assert pool_rows + files["holdout_rows"] == 768


def test_diabetes_chooses_each_arms_learning_rate_on_validation_not_on_the_held_out_set() -> None:
    from fedtune.simulations.benchmarks.diabetes import choose_on_validation

    # Prepare: at lr 1e-3 the held-out AUC is higher, but validation prefers 5e-3; site 0's split is
    # one-class at 1e-3 (NaN), so 5e-3 wins there too; site 1 ties and keeps the first rate
    def row(arm: str, lr: float, val: float, held_out: float) -> dict[str, object]:
        return {"arm": arm, "learning_rate": lr, "validation_auc": val, "auc": held_out}

    rows = [
        row("federated", 1e-3, 0.70, 0.90),
        row("site 0", 1e-3, float("nan"), 0.95),
        row("site 1", 1e-3, 0.60, 0.50),
        row("federated", 5e-3, 0.80, 0.60),
        row("site 0", 5e-3, 0.10, 0.40),
        row("site 1", 5e-3, 0.60, 0.99),
    ]

    # Execute
    best = choose_on_validation(rows)

    # Assert
    assert {arm: r["learning_rate"] for arm, r in best.items()} == {
        "federated": 5e-3,
        "site 0": 5e-3,
        "site 1": 1e-3,
    }


def test_auc_or_nan_is_roc_auc_and_nan_on_a_one_class_split() -> None:
    from fedtune.simulations.benchmarks.stats import auc_or_nan

    # Prepare
    labels, scores = np.array([0, 1, 1, 0, 1]), np.array([0.2, 0.7, 0.4, 0.5, 0.9])

    # Execute / Assert
    assert auc_or_nan(labels, scores) == pytest.approx(roc_auc_score(labels, scores))
    assert np.isnan(auc_or_nan(np.ones(3), np.array([0.1, 0.2, 0.3])))


def _point(epoch: int, f1: float) -> dict[str, float]:
    return {"epoch": epoch, "accuracy": f1 + 0.5, "macro_f1": f1}


def test_rounds_rows_pair_each_round_with_the_same_epoch_and_find_where_targets_are_met() -> None:
    from fedtune.simulations.benchmarks.rounds import curve_rows, target_notes

    # Prepare: FedAvg climbs from 0.05 to 0.30; centralized is at 0.30 from epoch 5; two sites
    fed = [
        RoundRecord(round=r, accuracy=0.5, macro_f1=f)
        for r, f in [(0, 0.01), (1, 0.05), (5, 0.20), (10, 0.29)]
    ]
    central = [_point(1, 0.10), _point(5, 0.30), _point(10, 0.30)]
    local = [
        [_point(1, 0.02), _point(5, 0.04), _point(10, 0.06)],
        [_point(1, 0.04), _point(5, 0.08), _point(10, 0.10)],
    ]

    # Execute
    rows = curve_rows(fed, central, local, [1, 5, 10])
    notes = target_notes(rows)

    # Assert: gap and lift in points at each checkpoint; round 10 meets both targets, round 5 the lift only
    assert [r["round"] for r in rows] == [1, 5, 10]
    assert [r["gap_points"] for r in rows] == [5.0, 10.0, 1.0]
    assert [r["lift_points"] for r in rows] == [2.0, 14.0, 21.0]
    assert rows[2]["local_best_macro_f1"] == 0.10 and rows[2]["centralized_accuracy"] == 0.8
    assert notes[0].startswith("Target centralized - federated <= 2 points: first met at round 10")
    assert notes[1].startswith("Target federated - mean local-only >= 10 points: first met at round 5")


def test_rounds_rows_name_the_arm_missing_a_checkpoint() -> None:
    from fedtune.simulations.benchmarks.rounds import curve_rows

    fed = [RoundRecord(round=1, accuracy=0.5, macro_f1=0.1)]
    with pytest.raises(ValueError, match="site 1 arm has no score after epoch 1"):
        curve_rows(fed, [_point(1, 0.1)], [[_point(1, 0.1)], [_point(2, 0.1)]], [1])
    with pytest.raises(ValueError, match="no record of round 2"):
        curve_rows(fed, [_point(2, 0.1)], [], [2])


def _bench_quick(name: str, folder: Path) -> Path:
    """Run the real ``fedtune bench NAME --quick`` in ``folder`` (results/ is relative to the working
    directory); return its results folder."""
    proc = subprocess.run(
        [sys.executable, "-m", "fedtune.simulations.cli", "bench", name, "--quick"],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return folder / "results"


@pytest.mark.e2e
def test_bench_comm_quick_writes_well_formed_results(tmp_path: Path) -> None:
    # Execute
    results = _bench_quick("comm", tmp_path)

    # Assert: JSON
    data = json.loads((results / "comm.json").read_text())
    assert data["benchmark"] == "comm" and data["command"] == "fedtune bench comm --quick" and data["quick"]
    assert {"cpu", "cores", "torch", "flwr"} <= set(data["machine"])
    rows = data["rows"]
    assert {r["secagg"] for r in rows} == {"plain", "SecAgg+"}
    for r in rows:
        assert r["up_bytes_per_site"] > 0 and r["down_bytes_per_site"] > 0
        # full fine-tuning moves more bytes than any PEFT arm, in both directions
        assert r["full_ft_over_up"] > 1 and r["full_ft_over_down"] > 1 and r["full_ft_over_total"] > 1
        assert r["full_ft_bytes_each_way"] == data["full_ft_bytes"]
    plain_adapter = next(r["adapter_up_bytes_per_site"] for r in rows if r["secagg"] == "plain")
    assert plain_adapter >= next(r["adapter_bytes"] for r in rows)  # the fp32 adapter (plus its framing)
    for r in (r for r in rows if r["secagg"] == "SecAgg+"):
        # the uint32 masked vector is the fp32 adapter's size; key material and shares come on top
        assert 0.99 < r["secagg_adapter_up_overhead"] <= 1.05
        assert r["secagg_adapter_up_overhead"] < r["secagg_up_overhead"] <= 1.25
    # Assert: markdown table and plot
    md = (results / "comm.md").read_text()
    assert md.startswith("## comm\n") and "`fedtune bench comm --quick`" in md
    header = next(line for line in md.splitlines() if line.startswith("| method"))
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(rows) and all(line.count("|") == header.count("|") for line in table)
    assert (results / "comm_bytes.png").read_bytes()[:4] == b"\x89PNG"
    assert (results / "work" / "comm").is_dir()


@pytest.mark.e2e
def test_bench_rounds_quick_scores_every_arm_at_every_checkpoint(tmp_path: Path) -> None:
    # Execute
    results = _bench_quick("rounds", tmp_path)

    # Assert: one row per checkpoint with every arm's held-out scores; the FedAvg figures are the
    # coordinator's own per-round records; the in-process arms learned (scores differ along the curve)
    data = json.loads((results / "rounds.json").read_text())
    assert data["command"] == "fedtune bench rounds --quick" and data["settings"]["checkpoints"] == [1, 2, 3]
    rows = data["rows"]
    assert [r["round"] for r in rows] == [1, 2, 3]
    records = json.loads((results / "work" / "rounds" / "fedavg" / "metrics.json").read_text())
    assert [r["fedavg_macro_f1"] for r in rows] == [r["macro_f1"] for r in records[1:]]
    for r in rows:
        for key in ("fedavg_macro_f1", "centralized_macro_f1", "local_mean_macro_f1", "local_best_macro_f1"):
            assert 0.0 <= r[key] <= 1.0
        assert r["local_best_macro_f1"] >= r["local_mean_macro_f1"]
        assert r["gap_points"] == round(100 * (r["centralized_macro_f1"] - r["fedavg_macro_f1"]), 1)
        assert r["examples_seen"] == r["round"] * rows[0]["examples_seen"]
    assert len({r["centralized_accuracy"] for r in rows}) > 1
    assert any(n.startswith("Target centralized - federated <= 2 points") for n in data["notes"])
    assert (results / "rounds_macro_f1.png").read_bytes()[:4] == b"\x89PNG"


def test_tuning_summary_takes_the_best_validation_point_not_the_best_test_point() -> None:
    # Prepare: the test set would pick round 1; validation picks round 2
    def point(step: int, val: float, test: float) -> dict[str, float]:
        return {"step": step, "val_macro_f1": val, "test_macro_f1": test, "test_accuracy": test + 0.5}

    curve = [point(1, 0.20, 0.40), point(2, 0.30, 0.25), point(3, 0.28, 0.30)]

    # Execute
    row = bench_curves.summary("arm", curve, budget=3)

    # Assert
    assert (row["best"], row["val_f1_best"], row["test_f1_best"]) == (2, 0.30, 0.25)
    assert (row["val_f1_budget"], row["test_f1_budget"], row["test_acc_budget"]) == (0.28, 0.30, 0.80)
    assert bench_curves.summary("arm", curve[:2], budget=5)["val_f1_budget"] == 0.30  # short curve: its end
    # Assert: the held-out mean from the budget on (round 3 alone; rounds 2-3; a short curve's end)
    assert row["test_f1_late"] == pytest.approx(0.30)
    assert bench_curves.summary("arm", curve, budget=2)["test_f1_late"] == pytest.approx(0.275)
    assert bench_curves.summary("arm", curve[:2], budget=5)["test_f1_late"] == pytest.approx(0.25)


def _tuning_point(step: int, val: float, test: float) -> dict[str, float]:
    return {"step": step, "val_macro_f1": val, "test_macro_f1": test, "test_accuracy": test + 0.5}


def test_over_seeds_averages_each_seeds_summary_and_mean_curve_each_step() -> None:
    # Prepare: seed 42 peaks at round 2, seed 43 at round 1
    per_seed = {
        42: [_tuning_point(1, 0.20, 0.40), _tuning_point(2, 0.30, 0.20)],
        43: [_tuning_point(1, 0.50, 0.10), _tuning_point(2, 0.40, 0.30)],
    }

    # Execute
    row = bench_curves.over_seeds("arm", per_seed, budget=2)
    steps, val = bench_curves.mean_curve(per_seed.values(), "val_macro_f1")

    # Assert
    assert row["seeds"] == 2 and row["best"] == 1.5
    assert row["val_f1_best"] == pytest.approx(0.40) and row["test_f1_best"] == pytest.approx(0.15)
    assert row["val_f1_budget"] == pytest.approx(0.35) and row["test_f1_budget"] == pytest.approx(0.25)
    assert row["val_f1_budget_std"] == pytest.approx(np.std([0.30, 0.40], ddof=1))
    assert steps == [1, 2] and val == pytest.approx([0.35, 0.35])


def test_tuning_runs_each_arm_at_each_seed_and_assembles_saved_arms_only_on_request(
    tmp_path: Path, monkeypatch
) -> None:
    # Prepare: arms computed in-process by stand-ins that record their seed
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FEDTUNE_BENCH_RESUME", "1")
    computed: list[tuple[str, int]] = []

    def fed(bench: str, label: str, config: dict, sites: int) -> dict:
        computed.append((label, config["seed"]))
        return {"curve": [_tuning_point(1, 0.1, 0.2), _tuning_point(2, config["seed"] / 100, 0.3)]}

    monkeypatch.setattr(bench_tuning, "federated_curve", fed)
    monkeypatch.setattr(bench_tuning, "centralized_curve", lambda *a: {"curve": [_tuning_point(1, 0.3, 0.3)]})
    s = {**bench_tuning.settings(quick=True), "seeds": [42, 43]}

    # Execute
    first = bench_tuning.measure(s)
    again = bench_tuning.measure(s)  # resumed: nothing recomputed

    # Assert
    assert computed == [
        ("fedavg-old-defaults", 42),
        ("fedavg-old-defaults", 43),
        ("fedavg-la-e3-lr2e-3", 42),
        ("fedavg-la-e3-lr2e-3", 43),
    ]
    assert [r["seeds"] for r in first.rows] == [2, 2, 2] and again.rows == first.rows
    assert first.rows[0]["val_f1_budget"] == pytest.approx(0.425)

    # Execute: a third seed, from saved arms only
    monkeypatch.setenv("FEDTUNE_BENCH_SAVED_ONLY", "1")
    partial = bench_tuning.measure({**s, "seeds": [42, 43, 44]})

    # Assert: the rows stand on the saved seeds; the missing arms are named
    assert len(computed) == 4 and [r["seeds"] for r in partial.rows] == [2, 2, 2]
    assert partial.extra["missing"] == [
        "fedavg-old-defaults-seed44",
        "fedavg-la-e3-lr2e-3-seed44",
        "centralized-lr2e-3-seed44",
    ]
    assert partial.notes[-1].startswith(
        "Not run yet (assembled from saved arms only): fedavg-old-defaults-seed44"
    )


@pytest.mark.e2e
def test_bench_tuning_quick_scores_every_round_on_the_sites_validation_splits(tmp_path: Path) -> None:
    # Execute
    results = _bench_quick("tuning", tmp_path)

    # Assert: a point per round (epoch); the held-out figures are the coordinator's own records, and
    # the validation figure of the last round is the final shared adapter scored on the sites' splits
    data = json.loads((results / "tuning.json").read_text())
    arms = data["settings"]["arms"]
    assert [r["arm"] for r in data["rows"]] == arms
    for arm in arms:
        assert [p["step"] for p in data["curves"][arm]["42"]] == [1, 2]
    arm = "fedavg-la-e3-lr2e-3"
    records = json.loads((results / "work" / "tuning" / arm / "metrics.json").read_text())
    assert [p["test_macro_f1"] for p in data["curves"][arm]["42"]] == [r["macro_f1"] for r in records[1:]]
    cfg = parse_run_config(json.loads((results / "work" / "tuning" / arm / "run_config.json").read_text()))
    validation = training.concat([simulated_site(cfg, i, 3).test for i in range(3)])
    probs = training.shared_adapter_probs(cfg, results / "work" / "tuning" / arm, validation)
    final = score(probs, validation.labels, len(validation.label_names))
    assert data["curves"][arm]["42"][-1]["val_macro_f1"] == pytest.approx(final.macro_f1)
    assert (results / "tuning_curves.png").read_bytes()[:4] == b"\x89PNG"


def test_tuning_choice_is_made_on_validation_and_judges_the_targets_on_held_out() -> None:
    # Prepare: the held-out set would prefer the other federated arm; validation picks the first
    def row(arm: str, val_budget: float, test_budget: float, val_best: float, test_best: float) -> dict:
        return {
            "arm": arm,
            "best": 4,
            "val_f1_best": val_best,
            "test_f1_best": test_best,
            "val_f1_budget": val_budget,
            "test_f1_budget": test_budget,
            "test_acc_budget": 0.8,
        }

    rows = [
        row("fedavg-la-s30-lr5e-3-const", 0.33, 0.30, 0.34, 0.31),
        row("fedavg-old-defaults", 0.10, 0.35, 0.10, 0.36),
        row("centralized-lr5e-3", 0.35, 0.36, 0.50, 0.45),
        row("centralized-lr2e-3", 0.30, 0.40, 0.40, 0.60),
        # prefix arms never become the LoRA default, however well they score; the better one on
        # validation is judged against the LoRA reference
        row("prefix-la-s30-lr1e-2-const", 0.90, 0.24, 0.90, 0.24),
        row("prefix-la-s30-lr5e-3-const", 0.20, 0.50, 0.20, 0.50),
    ]

    # Execute
    notes = bench_tuning.choice_notes(rows)

    # Assert: 0.30 / 0.36 = 83% of centralized at the budget; 45 - 31 = 14 points at the best points
    assert "picks `fedavg-la-s30-lr5e-3-const`" in notes[0] and "centralized `centralized-lr5e-3`" in notes[0]
    assert notes[1].endswith("83% (met).")
    assert "`centralized-lr5e-3` epoch 4 held-out 0.450" in notes[2] and "+14.0 points" in notes[2]
    assert "missed" in notes[2]
    assert "head-fit=none (validation picks `prefix-la-s30-lr1e-2-const`" in notes[3]
    assert "+6.0 held-out points" in notes[3]
    assert notes[3].endswith("(target <= 5: missed).")
    assert len(bench_tuning.choice_notes(rows[:4])) == 3
    assert bench_tuning.choice_notes(rows[:2]) == []


def test_prefix_tuning_is_judged_against_lora_with_the_same_head_fit() -> None:
    # Prepare: LoRA with and without the solved head; prefix arms of both kinds, the held-out set
    # preferring the arm validation does not pick within each kind
    def row(arm: str, val_budget: float, test_budget: float) -> dict:
        return {"arm": arm, "val_f1_budget": val_budget, "test_f1_budget": test_budget}

    rows = [
        row("fedavg-la-s30-lr5e-3-const", 0.30, 0.31),
        row("fedavg-la-s30-lr5e-3-const-lda", 0.70, 0.72),
        row("prefix-la-s30-lr5e-3-const", 0.25, 0.28),
        row("prefix-la-s30-lr5e-3-const-lda", 0.69, 0.71),
        row("prefix-la-s30-lr1e-2-const-lda", 0.60, 0.75),
    ]
    prefix = [r for r in rows if r["arm"].startswith("prefix")]

    # Execute
    notes = bench_tuning._prefix_note(prefix, rows)

    # Assert: one note per head-fit, each against its own LoRA reference
    assert len(notes) == 2
    assert notes[0].startswith("Prefix tuning, head-fit=none (validation picks `prefix-la-s30-lr5e-3-const`")
    assert "`fedavg-la-s30-lr5e-3-const`: 0.300 / 0.310" in notes[0] and "= +3.0 held-out" in notes[0]
    assert notes[1].startswith(
        "Prefix tuning, head-fit=lda (validation picks `prefix-la-s30-lr5e-3-const-lda`"
    )
    assert "`fedavg-la-s30-lr5e-3-const-lda`: 0.700 / 0.720" in notes[1] and "= +1.0 held-out" in notes[1]
    assert notes[1].endswith("(target <= 5: met).")
    assert bench_tuning._prefix_note(prefix, rows[:1]) == [notes[0]]


def test_overhead_rows_are_each_timing_against_its_baseline() -> None:
    from fedtune.simulations.benchmarks.overhead import _rows

    # Prepare: a 12 s round; the slower site alone 8 s; both sites 14 s on 1 thread, 10 s on 2
    timing = {
        "fed_round": 12.0,
        "slowest_site": 8.0,
        "slowest_examples": 400,
        "both_one": 14.0,
        "both_many": 10.0,
        "examples": 700,
        "cores": 2,
        "site_eps": 25.0,
    }

    # Execute
    rows = _rows(timing)

    # Assert
    assert [r["ratio"] for r in rows] == pytest.approx([1.5, 1.0, 1.2, 1.4, 1.0, 2.0])
    assert [r["seconds"] for r in rows] == [12.0, 8.0, 12.0, 14.0, 10.0, None]
    assert rows[1]["examples_per_s"] == 50.0 and rows[4]["compared"].endswith("direct, 2 threads")


def test_privacy_targets_judge_patient_level_utility_round_time_attack_and_audit() -> None:
    from fedtune.simulations.benchmarks.privacy import dp_settings, targets
    from fedtune.simulations.benchmarks.spec import Outcome

    # Prepare: patient-level epsilon 8 costs 3 points, 2 costs 12; DP-SGD rounds 1.5x; one run's audit
    # beats its accountant
    def row(
        unit: str, eps: object, cost: float, ratio: float, mia: float, lb: float, acc: float | None
    ) -> dict:
        return {
            "unit": unit,
            "target_epsilon": eps,
            "macro_f1_cost_points": cost,
            "round_time_ratio": ratio,
            "mia_auc": mia,
            "empirical_epsilon_lb": lb,
            "accountant_epsilon": acc,
        }

    rows = [
        row("off", "inf", 0.0, 1.0, 0.70, 2.0, None),
        row("client", 8.0, 20.0, 1.1, 0.52, 0.5, 8.0),
        row("patient", 8.0, 3.0, 1.5, 0.53, 0.4, 7.9),
        row("patient", 2.0, 12.0, 1.4, 0.51, 2.5, 1.9),
    ]

    # Execute
    notes = targets(Outcome(rows), {})

    # Assert
    assert notes[0] == "Patient-level epsilon 8: macro-F1 cost in points: 3.0 (target <= 5.0: met)."
    assert notes[1] == "Patient-level epsilon 2: macro-F1 cost in points: 12.0 (target <= 10.0: missed)."
    assert notes[2].endswith(": 1.50x (target <= 2.00x: met).")
    assert notes[3].endswith(": 0.53 (target <= 0.55: met).")
    assert notes[4].endswith(": 1 (target <= 0: missed).")
    assert dp_settings("patient", 4.0, 5, 5) == {
        "dp-mode": "example",
        "dp-example-target-epsilon": 4.0,
        "dp-delta": 1e-5,
    }
    assert dp_settings("off", float("inf"), 5, 5) == {"dp-mode": "off"}


def test_privacy_arms_are_picked_by_name_with_the_baseline_first(monkeypatch) -> None:
    from fedtune.simulations.benchmarks.privacy import chosen_settings

    # Execute / Assert
    monkeypatch.setenv("FEDTUNE_BENCH_ARMS", "off,patient-8,patient-2")
    assert chosen_settings(quick=False)["arms"] == [["off", "inf"], ["patient", "8"], ["patient", "2"]]
    monkeypatch.setenv("FEDTUNE_BENCH_ARMS", "patient-8")
    with pytest.raises(ValueError, match="first arm must be `off`"):
        chosen_settings(quick=False)
    monkeypatch.setenv("FEDTUNE_BENCH_ARMS", "off,patient-3")
    with pytest.raises(ValueError, match="unknown patient-3; valid: off, client-8, client-2, patient-8"):
        chosen_settings(quick=False)


def test_a_saved_arm_stays_valid_when_a_new_option_is_added_at_its_default(tmp_path: Path) -> None:
    from fedtune.common.config import defaults
    from fedtune.simulations.benchmarks.arms import cached, resolved, saved

    # Prepare: an arm saved before the option `dp-example-clipping-norm` existed
    key = {"sites": 3, "config": resolved({"seed": 7})}
    cached(tmp_path / "arm.json", key, lambda: {"score": 1.0})
    entry = json.loads((tmp_path / "arm.json").read_text())
    del entry["key"]["config"]["dp-example-clipping-norm"]
    (tmp_path / "arm.json").write_text(json.dumps(entry))
    changed = {"sites": 3, "config": resolved({"seed": 7, "dp-example-clipping-norm": 2.0})}

    # Execute / Assert: at its default the new option changes nothing; set otherwise, it does
    assert defaults()["dp-example-clipping-norm"] == 1.0
    assert saved(tmp_path / "arm.json", key) == {"score": 1.0}
    assert saved(tmp_path / "arm.json", changed) is None
    assert saved(tmp_path / "arm.json", {"sites": 4, "config": key["config"]}) is None
    assert saved(tmp_path / "arm.json", {"sites": 3, "config": resolved({"seed": 8})}) is None


def test_llm_targets_compare_federated_with_centralized_and_zero_shot_category_match() -> None:
    # Prepare: federated 2.5 points under centralized, 30 over zero-shot; a 0.7% upload
    rows = [
        {"arm": "zero-shot", "category_match": 0.0},
        {"arm": "federated", "category_match": 0.30, "upload_share_percent": 0.7},
        {"arm": "centralized", "category_match": 0.325},
    ]

    # Execute
    notes = bench_llm.targets(bench_llm.Outcome(rows), {})

    # Assert
    assert notes[0].startswith("Category match, centralized 32.5 - federated 30.0: 2.5 points")
    assert notes[0].endswith("(target <= 3.0 points: met).")
    assert "+30.0 points (zero-shot 0.0" in notes[1]
    assert notes[2] == "Upload per site per round / full model: 0.700% (target <= 1.000%: met)."
    rows[1]["category_match"] = 0.29  # 3.5 points under centralized
    assert "missed" in bench_llm.targets(bench_llm.Outcome(rows), {})[0]


def test_llm_local_rows_are_the_mean_site_and_the_best_site_by_category_match() -> None:
    sites = [
        {"exact_match": 0.1, "category_match": 0.2, "valid_code": 0.9, "loss": 2.0, "steps": 6},
        {"exact_match": 0.3, "category_match": 0.1, "valid_code": 0.5, "loss": 1.0, "steps": 6},
    ]
    mean, best = bench_llm._local_rows(sites)
    assert mean == pytest.approx(
        {
            "arm": "local-mean",
            "exact_match": 0.2,
            "category_match": 0.15,
            "valid_code": 0.7,
            "loss": 1.5,
            "steps": 6,
        }
    )
    assert best == {"arm": "local-best", **{k: v for k, v in sites[0].items()}}
