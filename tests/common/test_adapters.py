"""Tests of fedtune.common.adapters: wire arrays, validation, sizes, and the shared-adapter writer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fedtune.common.adapters import (
    adapter_names,
    arrays_fingerprint,
    get_adapter_arrays,
    nbytes,
    save_shared_adapter,
    set_adapter_arrays,
)
from fedtune.common.config import FedConfig
from fedtune.common.model import PeftSpec, build_peft_model, load_tokenizer
from fedtune.common.run_folder import ADAPTER_METADATA
from peft import PeftModel, get_peft_model_state_dict
from transformers import AutoModelForSequenceClassification

NUM_LABELS = 3
TEXTS = ["fever and dry cough for three days", "invoice paid by bank transfer", "fractured left wrist"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module", params=["lora", "prefix"])
def method(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def model(base_dir: Path, method: str) -> PeftModel:
    # A seed of its own: this module mutates the process-cached model, no other module gets it.
    return build_peft_model(
        PeftSpec.from_config(FedConfig(peft_method=method, seed=11), base_dir, NUM_LABELS)
    )


def _random_like(arrays: list[np.ndarray], seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(0.0, 0.1, a.shape).astype(np.float32) for a in arrays]


def _perturb_trainables(model: PeftModel, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))


def _logits(model: torch.nn.Module, base_dir: Path) -> torch.Tensor:
    enc = load_tokenizer(base_dir)(TEXTS, truncation=True, max_length=16, padding=True, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        return model(**enc).logits


# ---- wire arrays ---------------------------------------------------------------------------------------


def test_arrays_follow_sorted_state_names_as_float32_copies(model: PeftModel) -> None:
    # Prepare
    state = get_peft_model_state_dict(model)

    # Execute
    names = adapter_names(model)
    arrays = get_adapter_arrays(model)
    arrays[0][...] = 123.0

    # Assert
    assert names == sorted(state) and len(arrays) == len(names)
    assert all(a.dtype == np.float32 for a in arrays)
    assert [a.shape for a in arrays] == [tuple(state[n].shape) for n in names]
    assert not np.any(get_adapter_arrays(model)[0] == 123.0)  # a copy, not a view of the weights
    assert any("classifier" in n for n in names)


def test_set_then_get_round_trips(model: PeftModel) -> None:
    # Prepare
    arrays = _random_like(get_adapter_arrays(model), seed=1)

    # Execute
    set_adapter_arrays(model, arrays)
    back = get_adapter_arrays(model)

    # Assert
    assert len(back) == len(arrays)
    assert all(np.array_equal(a, b) for a, b in zip(arrays, back, strict=True))


@pytest.mark.parametrize("count_delta", [-1, 1])
def test_wrong_count_is_rejected(model: PeftModel, count_delta: int) -> None:
    # Prepare
    arrays = get_adapter_arrays(model)
    arrays = arrays[:-1] if count_delta < 0 else [*arrays, np.zeros(1, np.float32)]

    # Execute
    with pytest.raises(ValueError) as excinfo:
        set_adapter_arrays(model, arrays)

    # Assert
    assert f"has {len(adapter_names(model))} tensors" in str(excinfo.value)
    assert f"received {len(arrays)}" in str(excinfo.value)


@pytest.mark.parametrize("position", [0, -1])
def test_wrong_shape_names_the_tensor(model: PeftModel, position: int) -> None:
    # Prepare
    before = get_adapter_arrays(model)
    arrays = get_adapter_arrays(model)
    good = arrays[position]
    arrays[position] = np.zeros((*good.shape[:-1], good.shape[-1] + 1), np.float32)

    # Execute
    with pytest.raises(ValueError) as excinfo:
        set_adapter_arrays(model, arrays)

    # Assert
    message = str(excinfo.value)
    assert f"`{adapter_names(model)[position]}`" in message
    assert str(good.shape) in message and str(arrays[position].shape) in message
    assert all(np.array_equal(a, b) for a, b in zip(before, get_adapter_arrays(model), strict=True))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_rejected_and_nothing_is_loaded(model: PeftModel, bad: float) -> None:
    # Prepare
    before = get_adapter_arrays(model)
    arrays = _random_like(before, seed=2)
    arrays[-1].flat[0] = bad

    # Execute
    with pytest.raises(ValueError) as excinfo:
        set_adapter_arrays(model, arrays)

    # Assert
    assert f"`{adapter_names(model)[-1]}`" in str(excinfo.value)
    assert "non-finite" in str(excinfo.value)
    assert all(np.array_equal(a, b) for a, b in zip(before, get_adapter_arrays(model), strict=True))


# ---- sizes and fingerprints ------------------------------------------------------------------------


def test_nbytes_counts_dtype_size_times_elements() -> None:
    # Prepare
    arrays = [np.zeros((3, 4), np.float32), np.zeros(5, np.float64), np.zeros(0, np.float32)]

    # Execute / Assert
    assert nbytes(arrays) == 3 * 4 * 4 + 5 * 8
    assert nbytes([]) == 0


@pytest.mark.parametrize(
    ("other", "same"),
    [
        ([np.arange(6, dtype=np.float32).reshape(2, 3), np.ones(2, np.float32)], True),
        ([np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3)), np.ones(2, np.float32)], True),
        ([np.ones(2, np.float32), np.arange(6, dtype=np.float32).reshape(2, 3)], False),
        ([np.arange(6, dtype=np.float32).reshape(3, 2), np.ones(2, np.float32)], False),
        ([np.arange(6, dtype=np.float64).reshape(2, 3), np.ones(2, np.float32)], False),
        ([np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1, 1.0001], np.float32)], False),
    ],
)
def test_arrays_fingerprint_covers_order_dtype_shape_and_values(other: list[np.ndarray], same: bool) -> None:
    # Prepare
    reference = [np.arange(6, dtype=np.float32).reshape(2, 3), np.ones(2, np.float32)]

    # Execute
    result = arrays_fingerprint(other) == arrays_fingerprint(reference)

    # Assert
    assert result is same
    assert len(arrays_fingerprint(reference)) == 64


# ---- shared adapter -----------------------------------------------------------------------------------


def test_saved_adapter_loads_with_plain_peft(model: PeftModel, base_dir: Path, tmp_path: Path) -> None:
    # Prepare
    _perturb_trainables(model, seed=3)
    expected = _logits(model, base_dir)
    out = tmp_path / "adapter"

    # Execute
    returned = save_shared_adapter(model, out, {"round": 4, "task": "toy"})
    base = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=NUM_LABELS)
    loaded = PeftModel.from_pretrained(base, out)
    got = _logits(loaded, base_dir)

    # Assert
    assert returned == out
    assert {"adapter_config.json", "adapter_model.safetensors", ADAPTER_METADATA} <= {
        p.name for p in out.iterdir()
    }
    meta = json.loads((out / ADAPTER_METADATA).read_text())
    assert meta == {
        "round": 4,
        "task": "toy",
        "adapter_fingerprint": arrays_fingerprint(get_adapter_arrays(model)),
    }
    assert got.shape == (len(TEXTS), NUM_LABELS)
    assert torch.allclose(got, expected, atol=1e-6)


def test_saving_again_replaces_the_folder_without_leftovers(model: PeftModel, tmp_path: Path) -> None:
    # Prepare
    out = tmp_path / "checkpoint"
    save_shared_adapter(model, out, {"round": 1})
    (out / "stale.txt").write_text("from round 1")
    (tmp_path / "checkpoint.tmp").mkdir()  # left behind by an earlier crash
    _perturb_trainables(model, seed=4)

    # Execute
    save_shared_adapter(model, out, {"round": 2})

    # Assert
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    assert not (out / "stale.txt").exists()
    meta = json.loads((out / ADAPTER_METADATA).read_text())
    assert meta["round"] == 2
    assert meta["adapter_fingerprint"] == arrays_fingerprint(get_adapter_arrays(model))
