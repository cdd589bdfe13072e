"""Tests of fedtune.common.model: base fingerprint, model-dir checks, PEFT registry, frozen base."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from fedtune.common import base_files
from fedtune.common.base_files import (
    FingerprintMismatchError,
    fingerprint,
    packaged_model_dir,
    resolve_base,
    resolve_model_dir,
    verify_fingerprint,
)
from fedtune.common.config import ConfigError, FedConfig, parse_run_config
from fedtune.common.model import (
    PEFT_FIELDS,
    PEFT_METHODS,
    PeftSpec,
    base_model_nbytes,
    build_peft_model,
    checkpoint_tensors,
    frozen_state_fingerprint,
    hash_tensors,
    load_base_model,
    load_tokenizer,
    trainable_counts,
)
from peft import PeftModel, PeftModelForCausalLM, TaskType
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

PERTURBED = "encoder.layer.0.attention.self.query.weight"
PEFT_MARKERS = ("lora_", "prompt_encoder", "modules_to_save")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def checkpoint(base_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(base_dir / "model.safetensors")


def _write_checkpoint(folder: Path, base_dir: Path, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True)
    shutil.copy(base_dir / "config.json", folder / "config.json")
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


# ---- fingerprint -----------------------------------------------------------------------------------


def test_fingerprint_is_stable_64_hex(base_dir: Path) -> None:
    # Prepare / Execute
    first = fingerprint(base_dir)
    hashed = hash_tensors(checkpoint_tensors(base_dir))

    # Assert
    assert re.fullmatch(r"[0-9a-f]{64}", first)
    assert hashed == first == fingerprint(base_dir)


def test_copied_model_dir_has_the_same_fingerprint(base_dir: Path, tmp_path: Path) -> None:
    # Prepare
    copy = Path(shutil.copytree(base_dir, tmp_path / "copy"))

    # Execute
    copied = fingerprint(copy)

    # Assert
    assert copied == fingerprint(base_dir)
    verify_fingerprint(copy, fingerprint(base_dir))  # no error


def test_pytorch_bin_copy_has_the_same_fingerprint(
    base_dir: Path, checkpoint: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    # Prepare
    folder = tmp_path / "bin"
    folder.mkdir()
    shutil.copy(base_dir / "config.json", folder / "config.json")
    torch.save(checkpoint, folder / "pytorch_model.bin")

    # Execute
    converted = fingerprint(folder)

    # Assert
    assert converted == fingerprint(base_dir)


def test_one_changed_weight_changes_fingerprint_and_is_refused(
    base_dir: Path, checkpoint: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    # Prepare
    tensors = dict(checkpoint)
    tensors[PERTURBED] = checkpoint[PERTURBED].clone()
    tensors[PERTURBED][0, 0] += 1e-3
    folder = _write_checkpoint(tmp_path / "perturbed", base_dir, tensors)
    pinned = fingerprint(base_dir)

    # Execute
    local = fingerprint(folder)
    with pytest.raises(FingerprintMismatchError) as excinfo:
        verify_fingerprint(folder, pinned)

    # Assert
    assert local != pinned
    assert pinned in str(excinfo.value) and local in str(excinfo.value)
    assert str(folder) in str(excinfo.value)


@pytest.mark.parametrize(
    ("change", "same"),
    [
        ("reorder", True),
        ("rename", False),
        ("dtype", False),
        ("reshape", False),
        ("value", False),
        ("drop", False),
    ],
)
def test_hash_tensors_covers_names_dtypes_shapes_and_bytes(change: str, same: bool) -> None:
    # Prepare
    a, b = torch.arange(6, dtype=torch.float32).reshape(2, 3), torch.ones(4, dtype=torch.int64)
    original = {"a": a, "b": b}
    changed = {
        "reorder": {"b": b, "a": a},
        "rename": {"a2": a, "b": b},
        "dtype": {"a": a.double(), "b": b},
        "reshape": {"a": a.reshape(3, 2), "b": b},
        "value": {"a": a + torch.tensor([[0, 0, 0], [0, 0, 1e-6]]), "b": b},
        "drop": {"a": a},
    }[change]

    # Execute
    result = hash_tensors(changed) == hash_tensors(original)

    # Assert
    assert result is same


def test_base_model_nbytes_counts_every_checkpoint_tensor(
    base_dir: Path, checkpoint: dict[str, torch.Tensor]
) -> None:
    # Prepare
    expected = sum(t.numel() * t.element_size() for t in checkpoint.values())

    # Execute / Assert
    assert base_model_nbytes(base_dir) == expected > 80_000_000


# ---- model directory -------------------------------------------------------------------------------


def test_empty_base_model_resolves_to_packaged_model() -> None:
    # Prepare / Execute
    path = resolve_model_dir("")

    # Assert
    assert path == packaged_model_dir()
    assert (path / "config.json").is_file()


@pytest.mark.parametrize("make_dir", [True, False])
def test_resolve_model_dir_without_config_names_base_model(tmp_path: Path, make_dir: bool) -> None:
    # Prepare
    folder = tmp_path / "not-a-model"
    if make_dir:
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"")

    # Execute
    with pytest.raises(FileNotFoundError) as excinfo:
        resolve_model_dir(str(folder))

    # Assert
    assert "`base-model`" in str(excinfo.value) and "config.json" in str(excinfo.value)


def test_resolve_model_dir_accepts_a_local_folder(base_dir: Path, tmp_path: Path) -> None:
    # Prepare
    folder = tmp_path / "m"
    folder.mkdir()
    shutil.copy(base_dir / "config.json", folder / "config.json")

    # Execute / Assert
    assert resolve_model_dir(str(folder)) == folder.resolve()


def test_fingerprint_of_folder_without_weights_names_base_model(base_dir: Path, tmp_path: Path) -> None:
    # Prepare
    folder = tmp_path / "config-only"
    folder.mkdir()
    shutil.copy(base_dir / "config.json", folder / "config.json")

    # Execute / Assert
    with pytest.raises(FileNotFoundError, match="`base-model`"):
        fingerprint(folder)


def test_checkpoint_missing_a_base_weight_is_rejected(
    base_dir: Path, checkpoint: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    # Prepare
    tensors = {k: v for k, v in checkpoint.items() if not k.startswith("pooler.")}
    folder = _write_checkpoint(tmp_path / "no-pooler", base_dir, tensors)

    # Execute
    with pytest.raises(ValueError) as excinfo:
        load_base_model(folder, num_labels=2)

    # Assert
    message = str(excinfo.value)
    assert "`base-model`" in message and "lacks 2 base weight(s)" in message
    assert "pooler.dense" in message


def test_complete_checkpoint_loads_with_a_fresh_head(base_dir: Path) -> None:
    # Prepare / Execute
    model = load_base_model(base_dir, num_labels=5)

    # Assert
    assert model.classifier.out_features == 5


# ---- PEFT registry ---------------------------------------------------------------------------------


def test_unsupported_method_lists_supported_ones() -> None:
    # Execute
    with pytest.raises(ConfigError) as excinfo:
        parse_run_config({"peft-method": "ia3"})

    # Assert
    message = str(excinfo.value)
    assert "`peft-method`" in message and "'ia3'" in message
    assert all(method in message for method in PEFT_METHODS)
    assert set(PEFT_METHODS) == {"lora", "prefix"}


def test_peft_spec_from_config_copies_model_fields(base_dir: Path) -> None:
    # Prepare
    cfg = FedConfig(
        peft_method="prefix",
        lora_r=4,
        lora_alpha=32,
        lora_dropout=0.1,
        lora_target_modules="query, key",
        prefix_virtual_tokens=7,
        prefix_projection=True,
        seed=3,
    )

    # Execute
    spec = PeftSpec.from_config(cfg, base_dir, num_labels=4)

    # Assert: the PEFT fields are kept; a field that does not shape the model is not part of the key
    assert (spec.model_dir, spec.num_labels) == (base_dir, 4)
    assert spec.peft.target_modules == ("query", "key")
    for name in PEFT_FIELDS:
        assert getattr(spec.peft, name) == getattr(cfg, name)
    other = dataclasses.replace(cfg, learning_rate=0.123, num_server_rounds=9)
    assert spec == PeftSpec.from_config(other, base_dir, num_labels=4)
    assert hash(spec) == hash(PeftSpec.from_config(other, base_dir, num_labels=4))
    assert spec != PeftSpec.from_config(dataclasses.replace(cfg, lora_r=5), base_dir, num_labels=4)


@pytest.mark.parametrize("method", ["lora", "prefix"])
def test_only_peft_and_head_parameters_train(
    base_dir: Path, checkpoint: dict[str, torch.Tensor], method: str
) -> None:
    # Prepare
    spec = PeftSpec.from_config(FedConfig(peft_method=method), base_dir, num_labels=3)

    # Execute
    model = build_peft_model(spec)
    params = dict(model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    n_trainable, n_total = trainable_counts(model)

    # Assert
    assert model is build_peft_model(spec)  # cached per spec
    assert trainable and all(any(m in n for m in PEFT_MARKERS) for n in trainable)
    assert all(not p.requires_grad for n, p in params.items() if not any(m in n for m in PEFT_MARKERS))
    assert any("classifier.modules_to_save" in n for n in trainable)
    method_marker = "lora_" if method == "lora" else "prompt_encoder"
    assert any(method_marker in n for n in trainable)
    assert n_trainable == sum(params[n].numel() for n in trainable)
    assert 0 < n_trainable / n_total < 0.01
    frozen_embeddings = [p for n, p in params.items() if n.endswith("bert.embeddings.word_embeddings.weight")]
    assert len(frozen_embeddings) == 1 and not frozen_embeddings[0].requires_grad
    assert torch.equal(frozen_embeddings[0], checkpoint["embeddings.word_embeddings.weight"])


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        # 6 layers x (query, value) x (A: r x 384 + B: 384 x r), head 384 x 3 + 3
        ("lora", 6 * 2 * (8 * 384 + 384 * 8) + 384 * 3 + 3),
        # 10 virtual tokens x 6 layers x (key, value) x 384, head 384 x 3 + 3
        ("prefix", 10 * 6 * 2 * 384 + 384 * 3 + 3),
        # FFA-LoRA trains B only: 6 layers x (query, value) x 384 x r, head
        ("lora-ffa", 6 * 2 * 384 * 8 + 384 * 3 + 3),
        # prefix through the MLP: 10 x 384 embedding, 384 -> 384 -> 6 x 2 x 384 (with biases), head
        ("prefix-projection", 10 * 384 + (384 * 384 + 384) + (384 * 6 * 2 * 384 + 6 * 2 * 384) + 384 * 3 + 3),
    ],
)
def test_trainable_counts_match_the_peft_shapes(base_dir: Path, method: str, expected: int) -> None:
    # Prepare
    name, _, variant = method.partition("-")
    cfg = FedConfig(
        peft_method=name,
        lora_variant="ffa" if variant == "ffa" else "standard",
        prefix_projection=variant == "projection",
    )
    spec = PeftSpec.from_config(cfg, base_dir, num_labels=3)

    # Execute
    n_trainable, _ = trainable_counts(build_peft_model(spec))

    # Assert
    assert n_trainable == expected


def test_frozen_state_fingerprint_ignores_trainables_and_sees_frozen() -> None:
    # Prepare
    model = torch.nn.Linear(3, 2)
    model.bias.requires_grad_(False)
    before = frozen_state_fingerprint(model)

    # Execute
    with torch.no_grad():
        model.weight.add_(1.0)
    after_trainable = frozen_state_fingerprint(model)
    with torch.no_grad():
        model.bias.add_(1.0)
    after_frozen = frozen_state_fingerprint(model)

    # Assert
    assert after_trainable == before
    assert after_frozen != before


def test_the_new_head_loads_without_transformers_notice_and_the_verbosity_is_restored(
    base_dir: Path, capfd
) -> None:
    from transformers.utils import logging as hf_logging

    # Prepare
    before = hf_logging.get_verbosity()

    # Execute
    model = load_base_model(base_dir, num_labels=3)  # the packaged encoder has no head

    # Assert: the head is new (3 outputs), nothing said about it, the caller's verbosity kept
    assert model.classifier.out_features == 3
    assert "newly initialized" not in capfd.readouterr().err
    assert hf_logging.get_verbosity() == before


# ---- causal LM (generative tasks) ------------------------------------------------------------------


def _causal_spec(model_dir: Path, **peft: object) -> PeftSpec:
    """A generative task's spec on ``model_dir`` (LoRA on the Llama attention's q and v by default)."""
    fields = {"lora_target_modules": "q_proj,v_proj", **peft}
    cfg = FedConfig(task="icd10-code", label_skew="none", **fields)  # type: ignore[arg-type]
    return PeftSpec.from_config(cfg, model_dir, num_labels=22)


def test_a_generative_task_builds_a_causal_lm_with_only_lora_trainable(
    tiny_causal_lm: Path, base_dir: Path
) -> None:
    # Prepare
    spec = _causal_spec(tiny_causal_lm)

    # Execute
    model = build_peft_model(spec)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}

    # Assert: a causal LM (no classifier head to train or save), LoRA on q_proj and v_proj only
    assert spec.causal and spec.task_type == TaskType.CAUSAL_LM
    classifier = PeftSpec.from_config(FedConfig(), base_dir, num_labels=3)
    assert not classifier.causal and classifier.task_type == TaskType.SEQ_CLS
    assert isinstance(model, PeftModelForCausalLM)
    assert isinstance(model.get_base_model(), LlamaForCausalLM)
    assert model.peft_config["default"].task_type == TaskType.CAUSAL_LM
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable} == {"q_proj", "v_proj"}
    # 2 layers x (q_proj 32 -> 32: A 8 x 32 + B 32 x 8; v_proj 32 -> 16 (2 key-value heads): 8 x 32 + 16 x 8)
    assert trainable_counts(model)[0] == 2 * ((8 * 32 + 32 * 8) + (8 * 32 + 16 * 8))


def test_prefix_tuning_on_a_causal_lm_trains_the_prefix_only(tiny_causal_lm: Path) -> None:
    # Prepare
    spec = _causal_spec(tiny_causal_lm, peft_method="prefix", lora_target_modules="")

    # Execute
    model = build_peft_model(spec)

    # Assert: 10 virtual tokens x 2 layers x (key, value) x 2 key-value heads x 8 dims
    assert model.peft_config["default"].task_type == TaskType.CAUSAL_LM
    assert all("prompt_encoder" in n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable_counts(model)[0] == 10 * 2 * 2 * 16


def test_lora_targets_the_causal_lm_lacks_are_named_with_its_linear_layers(tiny_causal_lm: Path) -> None:
    # Prepare: BERT's names on a Llama
    spec = _causal_spec(tiny_causal_lm, lora_target_modules="query,value")

    # Execute
    with pytest.raises(ValueError) as excinfo:
        build_peft_model(spec)

    # Assert
    message = str(excinfo.value)
    assert "`lora-target-modules` 'query,value'" in message
    assert str(tiny_causal_lm) in message and "LlamaForCausalLM" in message
    assert "down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj" in message


def test_a_saved_causal_adapter_loads_with_plain_peft_and_gives_the_same_logits(
    tiny_causal_lm: Path, tmp_path: Path
) -> None:
    # Prepare: a non-zero adapter (LoRA's B starts at 0, which would match any base)
    model = build_peft_model(_causal_spec(tiny_causal_lm))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen))
    model.eval()
    ids = torch.tensor([[5, 17, 42, 99, 3, 250], [7, 7, 120, 8, 64, 1]])
    with torch.no_grad():
        ours = model(input_ids=ids).logits

    # Execute
    model.save_pretrained(tmp_path / "adapter")
    base = AutoModelForCausalLM.from_pretrained(tiny_causal_lm).eval()
    with torch.no_grad():
        bare = base(input_ids=ids).logits
        loaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
        theirs = loaded(input_ids=ids).logits

    # Assert
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and set(config["target_modules"]) == {"q_proj", "v_proj"}
    assert torch.allclose(theirs, ours, atol=1e-6)
    assert not torch.allclose(bare, ours, atol=1e-3)  # the adapter changes the logits


def test_a_causal_lm_loads_without_its_tied_output_layer_but_not_without_another_weight(
    tiny_causal_lm: Path, tmp_path: Path
) -> None:
    # Prepare: the tied lm_head is not in the checkpoint; a copy lacking the final norm
    tensors = load_file(tiny_causal_lm / "model.safetensors")
    assert "lm_head.weight" not in tensors
    folder = tmp_path / "no-norm"
    folder.mkdir()
    shutil.copy(tiny_causal_lm / "config.json", folder / "config.json")
    save_file({k: v for k, v in tensors.items() if k != "model.norm.weight"}, folder / "model.safetensors")

    # Execute
    model = load_base_model(tiny_causal_lm, num_labels=22, causal=True)
    with pytest.raises(ValueError) as excinfo:
        load_base_model(folder, num_labels=22, causal=True)

    # Assert
    assert isinstance(model, LlamaForCausalLM) and model.dtype == torch.float32
    assert torch.equal(model.lm_head.weight, tensors["model.embed_tokens.weight"])
    assert "lacks 1 base weight(s)" in str(excinfo.value) and "model.norm.weight" in str(excinfo.value)


def test_a_generative_task_without_base_model_takes_the_packaged_llm(
    monkeypatch: pytest.MonkeyPatch, tiny_causal_lm: Path
) -> None:
    # Prepare: the packaged SmolLM2 is fetched on first use; here it is the tiny LM
    monkeypatch.setattr(base_files, "packaged_llm_dir", lambda: tiny_causal_lm)

    # Execute / Assert
    assert resolve_model_dir("", generative=True) == tiny_causal_lm
    assert resolve_base(FedConfig(task="icd10-code", label_skew="none")) == tiny_causal_lm
    assert resolve_base(FedConfig()) == packaged_model_dir()
    assert resolve_base(FedConfig(task="icd10-code", label_skew="none", base_model=str(tiny_causal_lm))) == (
        tiny_causal_lm.resolve()
    )


def test_a_tokenizer_without_padding_pads_with_eos(tiny_causal_lm: Path, tmp_path: Path) -> None:
    # Prepare
    tokenizer = AutoTokenizer.from_pretrained(tiny_causal_lm)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path)

    # Execute
    loaded = load_tokenizer(tmp_path)

    # Assert
    assert AutoTokenizer.from_pretrained(tmp_path).pad_token is None
    assert loaded.pad_token == loaded.eos_token == "<eos>"
    assert loaded.pad_token_id == loaded.eos_token_id
    assert load_tokenizer(tiny_causal_lm).pad_token == "<pad>"  # a tokenizer's own padding is kept
