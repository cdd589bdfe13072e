"""The base model's fingerprint, hashed once per folder state (``common/base_files.py``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from fedtune.common import base_files
from fedtune.common import model as model_module
from fedtune.common.base_files import fingerprint, remember_fingerprint
from fedtune.common.model import checkpoint_tensors, hash_tensors
from safetensors.torch import save_file


@pytest.fixture
def model_dir(tmp_path: Path, tiny_base_model: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of the tiny model, with a model cache of its own."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return Path(shutil.copytree(tiny_base_model, tmp_path / "model"))


@pytest.fixture
def hashes(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Counts the times the weights are really hashed (the folders read)."""
    calls: list[Path] = []

    def counted(folder: Path) -> dict[str, torch.Tensor]:
        calls.append(folder)
        return checkpoint_tensors(folder)

    monkeypatch.setattr(model_module, "checkpoint_tensors", counted)
    return calls


def _sidecars(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "cache" / "fedtune" / "models" / base_files.FINGERPRINTS).glob("*.json"))


def test_the_weights_are_hashed_once_then_read_from_the_sidecar(
    model_dir: Path, hashes: list[Path], tmp_path: Path
) -> None:
    # Execute
    first, second = fingerprint(model_dir), fingerprint(model_dir)

    # Assert: one hash, the true one, kept beside the folder's stamp
    assert first == second == hash_tensors(checkpoint_tensors(model_dir))
    assert hashes == [model_dir.resolve()]
    (sidecar,) = _sidecars(tmp_path)
    entry = json.loads(sidecar.read_text())
    assert entry["path"] == str(model_dir.resolve()) and entry["fingerprint"] == first
    assert [f[0] for f in entry["files"]] == ["model.safetensors"]


def test_a_changed_weight_is_hashed_again(model_dir: Path, hashes: list[Path]) -> None:
    # Prepare: fingerprint kept, then one weight changed in place
    before = fingerprint(model_dir)
    tensors = checkpoint_tensors(model_dir)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})

    # Execute
    after = fingerprint(model_dir)

    # Assert
    assert after != before and after == hash_tensors(tensors) and len(hashes) == 2


def test_a_copy_elsewhere_is_hashed_for_its_own_path(
    model_dir: Path, hashes: list[Path], tmp_path: Path
) -> None:
    # Prepare
    value = fingerprint(model_dir)
    copy = Path(shutil.copytree(model_dir, tmp_path / "copy"))

    # Execute / Assert: same weights, same fingerprint, but not taken from the other folder's sidecar
    assert fingerprint(copy) == value and hashes == [model_dir.resolve(), copy.resolve()]
    assert len(_sidecars(tmp_path)) == 2


def test_a_damaged_sidecar_is_hashed_again_and_rewritten(
    model_dir: Path, hashes: list[Path], tmp_path: Path
) -> None:
    # Prepare
    value = fingerprint(model_dir)
    (sidecar,) = _sidecars(tmp_path)
    sidecar.write_text("{not json")

    # Execute / Assert
    assert fingerprint(model_dir) == value and len(hashes) == 2
    assert json.loads(sidecar.read_text())["fingerprint"] == value


def test_a_remembered_fingerprint_is_used_while_the_files_are_unchanged(
    model_dir: Path, hashes: list[Path]
) -> None:
    # Prepare: what a site installing a received model records (it hashed the tensors already)
    remember_fingerprint(model_dir, "f" * 64)

    # Execute / Assert
    assert fingerprint(model_dir) == "f" * 64 and hashes == []


def test_an_unwritable_model_cache_hashes_every_time(
    model_dir: Path, hashes: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: the cache root is a file, so nothing can be written under it
    (tmp_path / "blocked").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "blocked"))

    # Execute / Assert
    assert fingerprint(model_dir) == fingerprint(model_dir) and len(hashes) == 2
