"""A new run is all or nothing: no folder mixes two runs, a failed fresh run leaves nothing behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fedtune.common.run_folder import (
    CHECKPOINT_ARRAYS,
    CHECKPOINT_STATE,
    RunFolder,
    fresh_run,
    previous_run_dir,
)
from fedtune.simulations import cli


def _finished_run(out: Path, tag: str) -> dict[str, str]:
    """A folder holding a run: metrics, run config and adapter, each marked with ``tag``."""
    files = {"metrics.json": f"[{json.dumps(tag)}]", "run_config.json": tag, "adapter/adapter.bin": tag}
    for name, text in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    return files


def _tree(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): p.read_text() for p in sorted(out.rglob("*")) if p.is_file()}


def _checkpoint(out: Path) -> None:
    folder = RunFolder(out).checkpoint
    folder.mkdir(parents=True)
    (folder / CHECKPOINT_STATE).write_text("{}")
    (folder / CHECKPOINT_ARRAYS).write_bytes(b"x")


class BoomError(Exception):
    pass


def test_a_fresh_run_that_fails_before_a_checkpoint_leaves_nothing(tmp_path: Path) -> None:
    # Execute
    with pytest.raises(BoomError), fresh_run(tmp_path / "run", echo=lambda _: None) as out:
        _finished_run(out, "half")  # e.g. run_config.json and a first metrics.json
        raise BoomError

    # Assert
    assert not (tmp_path / "run").exists()


def test_in_a_folder_with_other_files_only_what_the_run_added_is_removed(tmp_path: Path) -> None:
    # Prepare
    (tmp_path / "notes.txt").write_text("mine")

    # Execute
    with pytest.raises(BoomError), fresh_run(tmp_path, echo=lambda _: None):
        _finished_run(tmp_path, "half")
        raise BoomError

    # Assert
    assert _tree(tmp_path) == {"notes.txt": "mine"}


def test_an_overwritten_run_comes_back_intact_when_its_replacement_fails_early(tmp_path: Path) -> None:
    # Prepare
    out = tmp_path / "run"
    old = _finished_run(out, "old")
    messages: list[str] = []

    # Execute
    with pytest.raises(BoomError), fresh_run(out, echo=messages.append):
        assert not (out / "metrics.json").exists() and _tree(previous_run_dir(out)) == old  # moved aside
        _finished_run(out, "new")
        raise BoomError

    # Assert
    assert _tree(out) == old and not previous_run_dir(out).exists()
    assert messages[-1] == f"The run failed before its first checkpoint; the earlier run is back in {out}."


def test_an_overwritten_run_is_deleted_only_when_its_replacement_finishes(tmp_path: Path) -> None:
    # Prepare
    out = tmp_path / "run"
    _finished_run(out, "old")

    # Execute
    with fresh_run(out, echo=lambda _: None):
        new = _finished_run(out, "new")

    # Assert: only the new run, nothing mixed
    assert _tree(out) == new and not previous_run_dir(out).exists()


def test_a_run_that_fails_after_a_checkpoint_stays_resumable_beside_the_earlier_one(tmp_path: Path) -> None:
    # Prepare
    out = tmp_path / "run"
    old = _finished_run(out, "old")

    # Execute
    with pytest.raises(BoomError), fresh_run(out, echo=lambda _: None):
        _finished_run(out, "new")
        _checkpoint(out)
        raise BoomError

    # Assert
    assert RunFolder(out).find_checkpoint() is not None and (out / "run_config.json").read_text() == "new"
    assert _tree(previous_run_dir(out)) == old


def test_simulate_overwrite_that_fails_keeps_the_finished_run(tmp_path: Path, monkeypatch, capsys) -> None:
    import flwr.simulation

    # Prepare: a finished run; the new simulation writes its config, then ends without an adapter
    out = tmp_path / "run"
    old = _finished_run(out, "old")

    def failing_simulation(**kwargs: object) -> None:
        (out / "run_config.json").write_text("new")

    monkeypatch.setattr(flwr.simulation, "run_simulation", failing_simulation)

    # Execute
    rc = cli.main(["simulate", "--out", str(out), "--overwrite", "--num-clients", "2"])

    # Assert
    assert rc == 1 and "ended without writing" in capsys.readouterr().err
    assert _tree(out) == old and not previous_run_dir(out).exists()


def test_a_failed_deployment_keeps_its_logs_and_nothing_that_looks_like_a_run(tmp_path: Path) -> None:
    from fedtune.common.run_folder import outputs_discarded_on_failure

    # Prepare: what a deployment writes before its first round completes
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "superlink.log").write_text("why it failed")

    # Execute
    with pytest.raises(BoomError), outputs_discarded_on_failure(tmp_path):
        _finished_run(tmp_path, "half")
        (tmp_path / "audit" / "server").mkdir(parents=True)
        raise BoomError

    # Assert: the logs stay for diagnosis; the run's files are gone, so the folder can be reused
    assert _tree(tmp_path) == {"logs/superlink.log": "why it failed"}


def test_a_failed_deployment_after_a_checkpoint_keeps_everything(tmp_path: Path) -> None:
    from fedtune.common.run_folder import outputs_discarded_on_failure

    # Execute
    with pytest.raises(BoomError), outputs_discarded_on_failure(tmp_path):
        run = _finished_run(tmp_path, "half")
        _checkpoint(tmp_path)
        raise BoomError

    # Assert
    assert all((tmp_path / name).is_file() for name in run)
