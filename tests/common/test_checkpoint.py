"""The coordinator's checkpoint: round trip (FedAdam and accountant state), atomic writes, resume config."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
from fedtune.common import checkpoint, files
from fedtune.common.adapters import get_adapter_arrays
from fedtune.common.audit import trim_audit
from fedtune.common.base_files import resolve_model_dir
from fedtune.common.checkpoint import (
    ServerState,
    read_checkpoint,
    resume_config,
    rng_state,
    set_rng_state,
    write_checkpoint,
)
from fedtune.common.config import ConfigError, FedConfig
from fedtune.common.model import PeftSpec, build_peft_model
from fedtune.common.privacy import PrivacyAccountant
from fedtune.common.records import RoundRecord
from fedtune.common.run_folder import RunFolder
from fedtune.server.strategy_state import restore_strategy_state, strategy_state
from flwr.common import parameters_to_ndarrays
from peft import PeftModel
from safetensors.numpy import load_file
from server_strategies import fedadam, fit_results


@pytest.fixture(scope="module")
def model() -> PeftModel:
    # A seed of its own: no other module gets this process-cached model.
    return build_peft_model(PeftSpec.from_config(FedConfig(seed=23), resolve_model_dir(""), num_labels=2))


def _state(
    server_round: int, strategy, model: PeftModel, accountant: PrivacyAccountant | None
) -> ServerState:
    return ServerState(
        server_round=server_round,
        global_arrays=get_adapter_arrays(model),
        strategy_arrays=strategy_state(strategy),
        records=[RoundRecord(round=r, accuracy=0.1 * r) for r in range(server_round + 1)],
        base_fingerprint="f" * 64,
        accountant=accountant.state_dict() if accountant else None,
        rng=rng_state(),
    )


def test_checkpoint_round_trip_continues_fedadam_and_the_accountant_exactly(
    tmp_path: Path, model: PeftModel
) -> None:
    # Prepare: two FedAdam rounds and two accounted rounds
    strategy, _ = fedadam()
    for server_round in (1, 2):
        strategy.aggregate_fit(server_round, fit_results(server_round), [])
    accountant = PrivacyAccountant(noise_multiplier=1.1, delta=1e-5)
    accountant.step(1.0)
    accountant.step(0.5)
    state = _state(2, strategy, model, accountant)

    # Execute
    write_checkpoint(tmp_path / "checkpoint", model, {"task": "diabetes"}, state)
    back = read_checkpoint(tmp_path)

    # Assert: every piece comes back, dtypes included (FedAdam keeps float64)
    assert back.server_round == 2 and back.records == state.records and back.base_fingerprint == "f" * 64
    assert [a.dtype for a in back.strategy_arrays["m_t"]] == [np.float64, np.float64]
    for name in ("current_weights", "m_t", "v_t"):
        for a, b in zip(back.strategy_arrays[name], state.strategy_arrays[name], strict=True):
            np.testing.assert_array_equal(a, b)
    for a, b in zip(back.global_arrays, state.global_arrays, strict=True):
        np.testing.assert_array_equal(a, b)
    restored = PrivacyAccountant.from_state_dict(back.accountant)
    assert restored.history == accountant.history and restored.epsilon() == accountant.epsilon()

    # Assert: a fresh FedAdam restored from the checkpoint takes round 3 exactly as the original
    fresh, _ = fedadam()
    restore_strategy_state(fresh, back.strategy_arrays)
    want, _ = strategy.aggregate_fit(3, fit_results(3), [])
    got, _ = fresh.aggregate_fit(3, fit_results(3), [])
    for a, b in zip(parameters_to_ndarrays(got), parameters_to_ndarrays(want), strict=True):
        np.testing.assert_array_equal(a, b)

    # Assert: the folder is also a plain PEFT adapter that records its round
    folder = tmp_path / "checkpoint"
    assert {"adapter_config.json", "adapter_model.safetensors", "fedtune.json"} <= {
        p.name for p in folder.iterdir()
    }
    assert json.loads((folder / "fedtune.json").read_text())["round"] == 2
    assert len(load_file(str(folder / "adapter_model.safetensors"))) == len(state.global_arrays)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


def test_random_states_round_trip() -> None:
    # Prepare
    saved = json.loads(json.dumps(rng_state()))  # it must survive JSON
    want = (random.random(), np.random.rand())

    # Execute
    random.random(), np.random.rand()
    set_rng_state(saved)

    # Assert
    assert (random.random(), np.random.rand()) == want


def test_a_crash_while_writing_leaves_the_previous_checkpoint_intact(
    tmp_path: Path, model: PeftModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: round 1 is checkpointed
    strategy, _ = fedadam()
    write_checkpoint(tmp_path / "checkpoint", model, {}, _state(1, strategy, model, None))

    def crash(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt("killed")

    # Execute: killed while writing round 2's arrays
    monkeypatch.setattr(checkpoint, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(tmp_path / "checkpoint", model, {}, _state(2, strategy, model, None))
    monkeypatch.undo()

    # Assert
    assert read_checkpoint(tmp_path).server_round == 1

    # Execute: killed between the two renames that swap round 2 in
    real_replace = os.replace
    calls: list[str] = []

    def replace_then_crash(src: str, dst: str) -> None:
        calls.append(str(dst))
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", replace_then_crash)
    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(tmp_path / "checkpoint", model, {}, _state(2, strategy, model, None))
    monkeypatch.undo()

    # Assert: `checkpoint/` is gone for an instant; `checkpoint.old/` still holds round 1
    assert not (tmp_path / "checkpoint").exists()
    assert RunFolder(tmp_path).find_checkpoint() == tmp_path / "checkpoint.old"
    assert read_checkpoint(tmp_path).server_round == 1

    # Execute / Assert: the next write recovers, and leaves one checkpoint folder
    write_checkpoint(tmp_path / "checkpoint", model, {}, _state(2, strategy, model, None))
    assert read_checkpoint(tmp_path).server_round == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


def test_no_checkpoint_is_an_error_that_says_to_start_again(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no complete checkpoint.*without resuming"):
        read_checkpoint(tmp_path)


def test_resume_refuses_a_changed_key_and_keeps_the_rest(tmp_path: Path) -> None:
    # Prepare
    FedConfig(num_server_rounds=3, learning_rate=0.01, out_dir="elsewhere").save(tmp_path / "run_config.json")

    # Execute
    cfg = resume_config(tmp_path, {"num-server-rounds": "3", "learning-rate": "1e-2"})

    # Assert: equal overrides pass; the folder and the resume flag are the resumed run's
    assert (cfg.resume, cfg.out_dir, cfg.num_server_rounds, cfg.learning_rate) == (
        True,
        str(tmp_path),
        3,
        0.01,
    )
    with pytest.raises(
        ConfigError, match=r"`learning-rate` is 0\.01 in .*run_config\.json but 0\.02 was given"
    ):
        resume_config(tmp_path, {"learning-rate": "0.02"})
    with pytest.raises(ConfigError, match="`strategy`"):
        resume_config(
            tmp_path, FedConfig(num_server_rounds=3, learning_rate=0.01, strategy="fedadam").to_run_config()
        )
    with pytest.raises(ConfigError, match="no run_config.json"):
        resume_config(tmp_path / "nothing")


def test_trim_audit_drops_the_rounds_a_resumed_run_redoes(tmp_path: Path) -> None:
    # Prepare: records of rounds 1 and 2, and a line the crash cut short
    wire = tmp_path / "server" / "wire.jsonl"
    wire.parent.mkdir(parents=True)
    kept = [json.dumps({"round": 0, "node": 1}), json.dumps({"round": 1, "node": 1})]
    wire.write_text("\n".join([*kept, json.dumps({"round": 2, "node": 1}), '{"round": 2, "no']))
    for name in ("received-round-001-node-5.npz", "received-round-002-node-5.npz", "global-final.npz"):
        np.savez(tmp_path / "server" / name, a0=np.zeros(1))
    site = tmp_path / "sites" / "site-0"
    site.mkdir(parents=True)
    np.savez(site / "sent-round-002.npz", a0=np.zeros(1))

    # Execute
    trim_audit(tmp_path, after_round=1)

    # Assert
    assert wire.read_text() == "".join(line + "\n" for line in kept)
    assert sorted(p.name for p in tmp_path.rglob("*.npz")) == ["received-round-001-node-5.npz"]
