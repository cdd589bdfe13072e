"""FFA-LoRA (`lora-variant=ffa`): A frozen at the shared seeded init; only B and the head train and travel."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from fedtune.common.adapters import adapter_names, get_adapter_arrays, nbytes, set_adapter_arrays
from fedtune.common.config import ConfigError, FedConfig, parse_run_config
from fedtune.common.data import TextDataset
from fedtune.common.model import PeftSpec, _built, build_peft_model, load_tokenizer
from fedtune.common.train import train
from peft import PeftModel

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _spec(model_dir: Path, variant: str, seed: int = 31) -> PeftSpec:
    return PeftSpec.from_config(FedConfig(lora_variant=variant, seed=seed), model_dir, num_labels=2)


def _a_matrices(model: PeftModel) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}


def _site_data() -> TextDataset:
    texts = ("fever and cough", "broken arm after a fall", "chest pain at rest", "itchy rash") * 4
    return TextDataset(
        texts=texts,
        labels=np.array([0, 1, 1, 0] * 4),
        label_names=("a", "b"),
        serialisation="text",
        source="test",
    )


def test_ffa_freezes_a_and_trains_b_and_the_head(tiny_base_model: Path) -> None:
    model = build_peft_model(_spec(tiny_base_model, "ffa"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and not any("lora_A" in n for n in trainable)
    assert any("lora_B" in n for n in trainable) and any("modules_to_save" in n for n in trainable)
    assert any("lora_A" in n for n, _ in model.named_parameters())  # A is still in the model


def test_ffa_exchanges_only_b_and_the_head_at_about_half_the_lora_bytes(tiny_base_model: Path) -> None:
    # Prepare
    standard = build_peft_model(_spec(tiny_base_model, "standard"))
    ffa = build_peft_model(_spec(tiny_base_model, "ffa"))

    # Execute
    names_std, names_ffa = adapter_names(standard), adapter_names(ffa)

    # Assert
    assert names_ffa == [n for n in names_std if "lora_A" not in n]
    assert any("lora_A" in n for n in names_std) and not any("lora_A" in n for n in names_ffa)
    lora_std = nbytes(
        [a for n, a in zip(names_std, get_adapter_arrays(standard), strict=True) if "lora_" in n]
    )
    lora_ffa = nbytes([a for n, a in zip(names_ffa, get_adapter_arrays(ffa), strict=True) if "lora_" in n])
    assert lora_ffa * 2 == lora_std  # r x d for A and d x r for B on square query/value projections


def test_a_is_the_same_seeded_matrix_in_every_process_that_builds_the_model(tiny_base_model: Path) -> None:
    # Prepare: the coordinator's model, then a "site" built afresh (another process: the cache cleared)
    spec = _spec(tiny_base_model, "ffa", seed=77)
    coordinator_a = _a_matrices(build_peft_model(spec))

    # Execute
    _built.cache_clear()
    site_a = _a_matrices(build_peft_model(spec))
    other_seed_a = _a_matrices(build_peft_model(_spec(tiny_base_model, "ffa", seed=78)))

    # Assert
    assert coordinator_a.keys() == site_a.keys()
    assert all(torch.equal(coordinator_a[n], site_a[n]) for n in site_a)
    assert not all(torch.equal(coordinator_a[n], other_seed_a[n]) for n in other_seed_a)


def test_training_rounds_move_b_never_a_and_the_average_of_sites_is_exact(tiny_base_model: Path) -> None:
    # Prepare: two sites start each round from the global B; A must not move in any round
    model = build_peft_model(_spec(tiny_base_model, "ffa", seed=5))
    tokenizer = load_tokenizer(tiny_base_model)
    a_before = _a_matrices(model)
    global_arrays = get_adapter_arrays(model)
    data = _site_data()
    kwargs = dict(
        steps=2, batch_size=8, learning_rate=0.05, weight_decay=0.0, max_length=16, device=torch.device("cpu")
    )

    for _ in range(2):  # rounds
        updates = []
        for site_seed in (1, 2):  # sites
            set_adapter_arrays(model, global_arrays)
            train(model, tokenizer, data, seed=site_seed, **kwargs)
            updates.append(get_adapter_arrays(model))
        new_global = [(x + y) / 2 for x, y in zip(*updates, strict=True)]
        assert any(not np.array_equal(a, b) for a, b in zip(new_global, global_arrays, strict=True))
        global_arrays = new_global

    # Assert: A unchanged; with A shared, the averaged B gives exactly the average of the sites' B A
    a_after = _a_matrices(model)
    assert all(torch.equal(a_before[n], a_after[n]) for n in a_before)
    deltas = []
    for arrays in (*updates, global_arrays):
        set_adapter_arrays(model, arrays)
        deltas.append([m.lora_B["default"].weight @ m.lora_A["default"].weight for m in _lora_layers(model)])
    for site_1, site_2, averaged in zip(*deltas, strict=True):
        torch.testing.assert_close(averaged, (site_1 + site_2) / 2, rtol=1e-5, atol=1e-7)


def _lora_layers(model: PeftModel) -> list[torch.nn.Module]:
    return [m for m in model.modules() if hasattr(m, "lora_A") and "default" in m.lora_A]


def test_ffa_needs_lora() -> None:
    with pytest.raises(ConfigError, match="`lora-variant=ffa`.*`peft-method=lora`"):
        parse_run_config({"peft-method": "prefix", "lora-variant": "ffa"})
    assert FedConfig(lora_variant="ffa").lora_variant == "ffa"


def test_unknown_variant_lists_the_supported_ones() -> None:
    with pytest.raises(ConfigError, match="`lora-variant` got 'dora'; valid values: standard, ffa"):
        parse_run_config({"lora-variant": "dora"})
