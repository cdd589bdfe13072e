"""The coordinator (``server/federation.py``) run in process against real sites on a tiny model.

Each federation takes seconds (:mod:`local_grid`: real ServerApp logic, real ClientApps, no Ray).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import fake_task_identity
from fedtune.common import instructions
from fedtune.common.adapters import get_adapter_arrays, set_adapter_arrays
from fedtune.common.audit import load_arrays
from fedtune.common.checkpoint import read_checkpoint
from fedtune.common.model import PeftSpec, _built, build_peft_model, load_tokenizer, select_device
from fedtune.common.sites import coordinator_test_set
from fedtune.common.train import evaluate
from fedtune.server.run_state import RunState
from flwr.app import Message
from local_grid import fast_config, local_grid, run_federation
from safetensors.numpy import load_file

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module", autouse=True)
def _task() -> Iterator[None]:
    with fake_task_identity():
        yield


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory, tiny_base_model: Path) -> RunState:
    """3 sites, 2 rounds of FedAvg without SecAgg+, audited."""
    return run_federation(
        fast_config(tmp_path_factory.mktemp("plain"), tiny_base_model, secure_aggregation=False)
    )


@pytest.fixture(scope="module")
def masked(tmp_path_factory: pytest.TempPathFactory, tiny_base_model: Path) -> RunState:
    """The same federation under SecAgg+."""
    return run_federation(
        fast_config(tmp_path_factory.mktemp("masked"), tiny_base_model, secure_aggregation=True)
    )


def _saved_adapter(out: Path) -> list[np.ndarray]:
    tensors = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    return [tensors[k] for k in sorted(tensors)]


def test_the_shared_adapter_is_the_last_global_and_the_checkpoints(plain: RunState) -> None:
    # Execute
    saved = _saved_adapter(plain.folder.root)
    final = load_arrays(plain.folder.root / "audit" / "server" / "global-final.npz")[0]
    state = read_checkpoint(plain.folder.root)

    # Assert: the file written is what round 2 produced, as the checkpoint has it
    assert state.server_round == 2 and [r.round for r in plain.rounds.records] == [0, 1, 2]
    assert len(saved) == len(final) == len(state.global_arrays)
    for a, b, c in zip(saved, final, state.global_arrays, strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
    assert {p.name for p in plain.folder.plots.iterdir()} == {"quality.png", "loss.png", "bytes.png"}
    first = load_arrays(plain.folder.root / "audit" / "server" / "global-round-001.npz")[0]
    assert any(not np.array_equal(a, b) for a, b in zip(first, final, strict=True))  # training moved it


def test_each_rounds_score_is_the_shared_adapter_on_the_held_out_set(plain: RunState) -> None:
    # Prepare: a fresh model holding the final shared adapter
    cfg = plain.cfg
    test = coordinator_test_set(cfg)
    model = build_peft_model(PeftSpec.from_config(cfg, Path(cfg.base_model), len(test.label_names)))
    set_adapter_arrays(model, load_arrays(plain.folder.root / "audit" / "server" / "global-final.npz")[0])

    # Execute
    res = evaluate(
        model,
        load_tokenizer(Path(cfg.base_model)),
        test,
        batch_size=cfg.batch_size,
        max_length=cfg.max_length,
        device=select_device("cpu"),
    )

    # Assert: the round-2 record is that score, on every example of the held-out set
    last = plain.rounds.records[-1]
    assert (last.accuracy, last.macro_f1, last.loss) == pytest.approx((res.accuracy, res.macro_f1, res.loss))
    assert res.examples == len(test)
    metrics = json.loads((plain.folder.root / "metrics.json").read_text())
    assert metrics[-1]["accuracy"] == last.accuracy


def _upload_tensor_names(out: Path) -> set[str]:
    names = set()
    for line in (out / "audit" / "server" / "wire.jsonl").read_text().splitlines():
        record = json.loads(line)
        if (record["direction"], record["kind"]) == ("up", "train"):
            names.update(t["name"].split("[")[0] for t in record["tensors"])
    return names


def _upload_dtypes(out: Path, prefix: str) -> set[str]:
    records = map(json.loads, (out / "audit" / "server" / "wire.jsonl").read_text().splitlines())
    ups = [r for r in records if r["direction"] == "up"]
    return {t["dtype"] for r in ups for t in r["tensors"] if t["name"].startswith(prefix)}


def test_secure_aggregation_masks_every_upload_and_sums_to_the_plain_average(
    plain: RunState, masked: RunState
) -> None:
    # Execute
    plain_names, masked_names = (
        _upload_tensor_names(plain.folder.root),
        _upload_tensor_names(masked.folder.root),
    )

    # Assert: SecAgg+ on: masked vectors only; off: the adapter in the clear
    assert any(n.startswith("fitres.parameters") for n in plain_names)
    assert "secaggplus_configs.masked_params" in masked_names
    assert not any(n.startswith("fitres.parameters") for n in masked_names)
    # masked vectors cross the wire as uint32 (Flower's modulus range 2**32), the weight factor too
    assert _upload_dtypes(masked.folder.root, "secaggplus_configs.masked_params") == {"uint32"}
    # the unmasked sum gives the same shared adapter, within SecAgg+'s quantisation
    for a, b in zip(_saved_adapter(plain.folder.root), _saved_adapter(masked.folder.root), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-3)


def test_the_adapter_metadata_records_the_library_versions(plain: RunState) -> None:
    # Execute
    meta = json.loads((plain.folder.root / "adapter" / "fedtune.json").read_text())

    # Assert
    import peft
    import transformers

    assert meta["versions"]["transformers"] == transformers.__version__
    assert meta["versions"]["peft"] == peft.__version__
    assert meta["rounds"] == 2 and meta["base_model_fingerprint"] == plain.shared.fingerprint
    # two labels: the default head-fit=auto kept the averaged head, so no statistics were declared
    assert plain.cfg.head_fit == "auto" and "head_statistics_shapes" not in meta


def _instructions(grid_delivered: list[Message]) -> list[instructions.Instruction]:
    out = []
    for msg in grid_delivered:
        if msg.metadata.message_type == "train" and "fitins.config" in msg.content.config_records:
            out.append(instructions.decode(dict(msg.content.config_records["fitins.config"])))
    return out


def test_distributed_dp_sizes_each_sites_noise_and_accounts_one_step_per_round(
    tmp_path: Path, tiny_base_model: Path
) -> None:
    # Prepare: 2 of the 3 sites sampled each round (fraction-train 0.67), noise multiplier 1.5
    cfg = fast_config(
        tmp_path,
        tiny_base_model,
        dp_mode="distributed",
        dp_noise_multiplier=1.5,
        dp_clipping_norm=0.4,
        fraction_train=0.67,
        min_clients=2,
        secure_aggregation=False,
    )
    grid = local_grid(cfg)

    # Execute
    run_federation(cfg, grid=grid)

    # Assert: each sampled site adds sigma C / sqrt(n); the accountant saw rate 2/3 in each of 2 rounds
    sent = _instructions(grid.delivered)
    assert len(sent) == 4
    assert [ins.dp_noise_std for ins in sent] == pytest.approx([1.5 * 0.4 / 2**0.5] * 4)
    privacy = json.loads((tmp_path / "privacy.json").read_text())
    history = privacy["accountant"]["history"]
    assert len(history) == 2 and all(h == pytest.approx([1.5, 2 / 3]) for h in history)
    assert privacy["stopped_early"] == ""


def test_patient_level_dp_under_secagg_records_each_sites_epsilon_beside_the_client_level_one(
    tmp_path: Path, tiny_base_model: Path
) -> None:
    from fedtune.common.audit_report import build_report
    from fedtune.common.dp_sgd import example_dp
    from fedtune.common.sites import simulated_site

    # Prepare: DP-SGD at every site (sigma calibrated to 6 per patient) and distributed client-level DP;
    # canaries at site 0 for the audit
    cfg = fast_config(
        tmp_path,
        tiny_base_model,
        dp_mode="example+distributed",
        dp_example_target_epsilon=6.0,
        dp_noise_multiplier=0.5,
        secure_aggregation=True,
        audit_canaries=40,
    )

    # Execute
    coord = run_federation(cfg)

    # Assert: per round, each site's epsilon after all its steps so far; round 2 ends under the budget
    expected = {str(i): example_dp(cfg, len(simulated_site(cfg, i, 3).train)) for i in range(3)}
    for record in coord.rounds.records[1:]:
        assert sorted(record.sites_example_dp) == ["0", "1", "2"]
        for label, figures in record.sites_example_dp.items():
            dp = expected[label]
            assert figures["epsilon"] == pytest.approx(dp.epsilon_after(record.round))
            assert figures["sigma"] == pytest.approx(dp.noise_multiplier)
            assert figures["steps"] == record.round * dp.round_steps
        assert record.example_dp_epsilon == max(f["epsilon"] for f in record.sites_example_dp.values())
    assert coord.rounds.records[-1].example_dp_epsilon <= 6.0
    privacy = json.loads((tmp_path / "privacy.json").read_text())
    assert privacy["dp_mode"] == "example+distributed" and privacy["epsilon"] > 0  # client-level
    assert privacy["example_dp"]["sites"]["1"]["epsilon"] == pytest.approx(expected["1"].epsilon_after(2))
    assert privacy["example_dp"]["versions"]["opacus"]
    records = json.loads((tmp_path / "metrics.json").read_text())
    assert "sites_example_dp" in records[2] and "sites_example_dp" not in records[0]

    # Execute / Assert: the audit puts each site's patient-level epsilon, and the canary site's beside
    # the empirical lower bound
    report = build_report(tmp_path)
    site_eps = {k: v["epsilon"] for k, v in privacy["example_dp"]["sites"].items()}
    assert report["dp"]["example_epsilon_by_site"] == site_eps
    assert report["dp"]["accountant_epsilon"] == privacy["epsilon"]
    empirical = report["empirical_epsilon"]
    assert empirical["canary_site_example_epsilon"] == site_eps["0"]
    assert empirical["lower_bound"] <= empirical["canary_site_example_epsilon"]


def test_the_privacy_budget_stops_the_run_before_the_round_that_would_exceed_it(
    tmp_path: Path, tiny_base_model: Path
) -> None:
    from fedtune.common.privacy import compute_epsilon

    # Prepare: a budget between the epsilon after 1 round and after 2
    one = compute_epsilon(noise_multiplier=2.0, sampling_rate=1.0, rounds=1, delta=1e-5)
    two = compute_epsilon(noise_multiplier=2.0, sampling_rate=1.0, rounds=2, delta=1e-5)
    cfg = fast_config(
        tmp_path,
        tiny_base_model,
        dp_mode="central",
        dp_noise_multiplier=2.0,
        dp_target_epsilon=(one + two) / 2,
        secure_aggregation=False,
    )

    # Execute
    coord = run_federation(cfg)

    # Assert: round 1 ran, round 2 did not; the adapter is round 1's; the stop is recorded
    assert [r.round for r in coord.rounds.records] == [0, 1]
    privacy = json.loads((tmp_path / "privacy.json").read_text())
    assert privacy["stopped_early"].startswith("stopped before round 2")
    assert privacy["epsilon"] == pytest.approx(one) and privacy["epsilon"] <= cfg.dp_target_epsilon
    assert json.loads((tmp_path / "adapter" / "fedtune.json").read_text())["rounds"] == 1


def test_resume_refuses_a_checkpoint_made_with_other_base_weights(
    tmp_path: Path, tiny_base_model: Path
) -> None:
    import shutil

    from conftest import save_tiny_bert

    # Prepare: a finished run on a copy of the base model, whose weights are then replaced
    model = tmp_path / "model"
    shutil.copytree(tiny_base_model, model)
    run_federation(fast_config(tmp_path / "run", model, secure_aggregation=False))
    shutil.rmtree(model)
    save_tiny_bert(model, seed=2)
    _built.cache_clear()  # the per-process model cache keyed on the folder (a new process in real use)

    # Execute / Assert
    cfg = fast_config(tmp_path / "run", model, secure_aggregation=False, resume=True)
    with pytest.raises(
        ValueError, match="was made with base model fingerprint .* resume with the base model"
    ):
        run_federation(cfg)


def test_a_site_whose_update_is_refused_drops_out_and_the_others_aggregate(
    tmp_path: Path, tiny_base_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedtune.client.site import SiteClient

    # Prepare: site 2 produces a non-finite update in every round, under SecAgg+
    fit = SiteClient.fit

    def fit_nan_at_site_2(self: SiteClient, parameters: list, config: dict) -> tuple:
        arrays, n, metrics = fit(self, parameters, config)
        if self.site.partition_id == 2:
            arrays = [np.full_like(a, np.nan) for a in arrays]
        return arrays, n, metrics

    monkeypatch.setattr(SiteClient, "fit", fit_nan_at_site_2)
    cfg = fast_config(tmp_path, tiny_base_model, secure_aggregation=True)

    # Execute
    coord = run_federation(cfg)

    # Assert: both rounds aggregated without node 103, which the coordinator knows only by category
    assert [r.round for r in coord.rounds.records] == [0, 1, 2]
    for record in coord.rounds.records[1:]:
        assert list(record.excluded_sites) == ["103"]
        reason = record.excluded_sites["103"]
        assert "site error [update]" in reason and "Node" not in reason and "nan" not in reason.lower()
    assert all(np.isfinite(a).all() for a in _saved_adapter(tmp_path))
    log = (tmp_path / "site-logs" / "site-2.log").read_text()
    assert "[update] round 1 train: UpdateRefusedError: Node 103 refuses to mask its update" in log


def test_prefix_projection_federates_and_its_adapter_scores_as_recorded_with_plain_peft(
    tmp_path: Path, tiny_base_model: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    # Prepare / Execute: peft's MLP reparametrisation trains at the sites and is averaged
    cfg = fast_config(
        tmp_path, tiny_base_model, peft_method="prefix", prefix_projection=True, secure_aggregation=False
    )
    coord = run_federation(cfg)

    # Assert: the adapter written (the prefix the MLP computes) loads with plain peft and scores as recorded
    test = coordinator_test_set(cfg)
    base = AutoModelForSequenceClassification.from_pretrained(
        tiny_base_model, num_labels=len(test.label_names)
    )
    model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    res = evaluate(
        model,
        load_tokenizer(tiny_base_model),
        test,
        batch_size=cfg.batch_size,
        max_length=cfg.max_length,
        device=select_device("cpu"),
    )
    assert [r.round for r in coord.rounds.records] == [0, 1, 2]
    first = load_arrays(tmp_path / "audit" / "server" / "global-round-001.npz")[0]
    final = load_arrays(tmp_path / "audit" / "server" / "global-final.npz")[0]
    assert all(not np.array_equal(a, b) for a, b in zip(first, final, strict=True))  # prefix, MLP, head moved
    assert all(
        np.array_equal(a, b) for a, b in zip(get_adapter_arrays(coord.shared.model), final, strict=True)
    )
    assert (res.accuracy, res.loss) == pytest.approx(
        (coord.rounds.records[-1].accuracy, coord.rounds.records[-1].loss), abs=1e-5
    )


def test_sites_refuse_to_mask_values_secagg_would_clip_and_the_round_fails_naming_why(
    tmp_path: Path, tiny_base_model: Path
) -> None:
    # Prepare: a clipping range far below the adapter's values
    cfg = fast_config(tmp_path, tiny_base_model, secure_aggregation=True, secagg_clipping_range=1e-4)

    # Execute / Assert: every site refuses before masking; the coordinator learns only the category
    with pytest.raises(RuntimeError, match="Round 1 produced no aggregate") as info:
        run_federation(cfg)
    assert str(info.value).count("site error [update]") == 3
    assert "Weighted adapter value" not in str(info.value)
    assert "nothing to resume" in str(info.value) and not (tmp_path / "adapter").exists()
    assert "exceeds SecAgg+ `secagg-clipping-range`" in (tmp_path / "site-logs" / "site-0.log").read_text()
