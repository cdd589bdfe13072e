"""Frozen base model, its tensors' hash, and the PEFT method registry.

A site and the coordinator must tune the *same* frozen base model. The base is
identified by a SHA-256 fingerprint over its checkpoint tensors (names, dtypes,
shapes and bytes, in sorted order: :func:`hash_tensors`), so two copies in different file
formats or folders still match while any changed weight does not. Its folder, files and
the fingerprint kept per folder live in the torch-free :mod:`fedtune.common.base_files`.

One PEFT model is built per process and spec (``functools.cache``): a Ray actor
that serves many simulated sites loads the base model once.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import (
    LoraConfig,
    PeftConfig,
    PeftModel,
    PrefixTuningConfig,
    TaskType,
    get_peft_model,
)
from peft.utils import ModulesToSaveWrapper
from safetensors import safe_open
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from .base_files import resolve_base, weight_files
from .config import FedConfig
from .options import GENERATIVE_TASKS


def checkpoint_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint in ``model_dir``, by name (on the CPU)."""
    tensors: dict[str, torch.Tensor] = {}
    for file in weight_files(model_dir):
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt") as f:
                tensors.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118 - safe_open is no dict
        else:
            tensors.update(torch.load(file, map_location="cpu", weights_only=True))
    return tensors


def hash_tensors(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over ``name|dtype|shape|bytes`` of each tensor, in sorted name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


# the run-config fields that shape the PEFT model (declared once, in FedConfig)
PEFT_FIELDS: tuple[str, ...] = (
    "peft_method",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_target_modules",
    "lora_variant",
    "prefix_virtual_tokens",
    "prefix_projection",
    "seed",
)


@dataclass(frozen=True)
class PeftSpec:
    """Everything that shapes the PEFT model (hashable: it keys the per-process model cache).

    ``peft`` holds the run config's :data:`PEFT_FIELDS`, every other field at its default, so two
    runs that differ only in, say, the learning rate share one cached model. ``causal``: a causal
    language model that generates (a generative task; ``num_labels`` unused), else a classifier
    with a ``num_labels`` head.
    """

    model_dir: Path
    num_labels: int
    peft: FedConfig
    causal: bool = False

    @classmethod
    def from_config(cls, cfg: FedConfig, model_dir: Path, num_labels: int) -> PeftSpec:
        """The spec of ``cfg``'s PEFT fields on the base model in ``model_dir``."""
        peft = FedConfig(**{f: getattr(cfg, f) for f in PEFT_FIELDS})
        return cls(model_dir, num_labels, peft, causal=cfg.task in GENERATIVE_TASKS)

    @property
    def task_type(self) -> TaskType:
        """PEFT's task type: ``CAUSAL_LM`` or ``SEQ_CLS`` (which also trains and saves the head)."""
        return TaskType.CAUSAL_LM if self.causal else TaskType.SEQ_CLS


def _lora(spec: PeftSpec) -> PeftConfig:
    return LoraConfig(
        task_type=spec.task_type,
        r=spec.peft.lora_r,
        lora_alpha=spec.peft.lora_alpha,
        lora_dropout=spec.peft.lora_dropout,
        target_modules=list(spec.peft.target_modules),
    )


def _prefix(spec: PeftSpec) -> PeftConfig:
    return PrefixTuningConfig(
        task_type=spec.task_type,
        num_virtual_tokens=spec.peft.prefix_virtual_tokens,
        prefix_projection=spec.peft.prefix_projection,
    )


# method name -> PEFT config builder; for SEQ_CLS peft also trains and saves the classifier head.
PEFT_METHODS: dict[str, Callable[[PeftSpec], PeftConfig]] = {"lora": _lora, "prefix": _prefix}


def load_base_model(model_dir: Path, num_labels: int, *, causal: bool = False) -> torch.nn.Module:
    """Load the frozen base encoder with a fresh ``num_labels`` head, or a ``causal`` LM as it is.

    Raises
    ------
    ValueError
        When base weights other than the classifier head (or a causal LM's output layer tied to its
        embeddings) are missing from the checkpoint (they would be randomly initialised and differ
        between sites).
    """
    # transformers warns that the head is "newly initialized": it is meant to be, and any other
    # missing weight is refused below, so the notice is silenced
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        if causal:
            model, info = AutoModelForCausalLM.from_pretrained(
                model_dir, torch_dtype=torch.float32, output_loading_info=True
            )
        else:
            model, info = AutoModelForSequenceClassification.from_pretrained(
                model_dir, num_labels=num_labels, output_loading_info=True
            )
    finally:
        hf_logging.set_verbosity(verbosity)
    fresh = ("lm_head",) if causal and model.config.tie_word_embeddings else ("classifier",)
    missing = [k for k in info["missing_keys"] if not k.startswith(fresh)]
    if missing:
        raise ValueError(
            f"`base-model` {model_dir}: checkpoint lacks {len(missing)} base weight(s) (e.g. {missing[:3]}); "
            "they would be random and differ between sites. Use a complete checkpoint."
        )
    return model


def build_peft_model(spec: PeftSpec) -> PeftModel:
    """Base model + PEFT wrapper for ``spec``, at its seeded initial PEFT state.

    Built once per process and spec (:func:`_built`); every call resets the head and adapter to the
    run's ``seed``-seeded initialisation, so the coordinator's initial adapter is reproducible even in
    a process that ran another federation, and a site never starts from what the process trained last.
    """
    model, initial = _built(spec)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in initial:
                param.copy_(initial[name])
    return model


@functools.cache
def _built(spec: PeftSpec) -> tuple[PeftModel, dict[str, torch.Tensor]]:
    """The model of ``spec`` and a copy of its seeded initial trainable parameters."""
    peft = spec.peft
    torch.manual_seed(peft.seed)
    base = load_base_model(spec.model_dir, spec.num_labels, causal=spec.causal)
    model = _wrap(base, spec)
    frozen_a = peft.peft_method == "lora" and peft.lora_variant == "ffa"  # FFA-LoRA: A never exchanged
    for name, p in model.named_parameters():
        if frozen_a and "lora_A" in name:
            p.requires_grad_(False)  # FFA-LoRA: A stays at the seeded init every site shares
        # Only PEFT parameters and the peft-managed copy of the head may train.
        assert p.requires_grad == (_is_peft_param(name) and not (frozen_a and "lora_A" in name)), name
    return model, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _wrap(base: torch.nn.Module, spec: PeftSpec) -> PeftModel:
    """``get_peft_model``; LoRA target modules the base lacks are an error naming the ones it has."""
    try:
        return get_peft_model(base, PEFT_METHODS[spec.peft.peft_method](spec))
    except ValueError as err:
        if "target modules" not in str(err).lower():
            raise
        modules = base.named_modules()
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in modules if isinstance(m, torch.nn.Linear)})
        raise ValueError(
            f"`lora-target-modules` {spec.peft.lora_target_modules!r}: no such module in the base model "
            f"{spec.model_dir} ({type(base).__name__}); its linear layers are {', '.join(linear)}. Set "
            "`lora-target-modules` to some of them (attention: `query,value` for BERT, `q_proj,v_proj` for "
            "Llama-style models)."
        ) from None


def _is_peft_param(name: str) -> bool:
    return "lora_" in name or "prompt_encoder" in name or "modules_to_save" in name


@functools.cache
def load_tokenizer(model_dir: Path) -> PreTrainedTokenizerBase:
    """The base model's tokenizer (cached per process); one without a padding token pads with EOS."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def select_device(preference: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available else CPU; ``cuda`` without a GPU is an error."""
    if preference == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("`device=cuda` but no CUDA GPU is visible; use `device=auto` or `device=cpu`.")
    if preference in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


@dataclass(frozen=True)
class ModelParts:
    """What scoring or training a run's PEFT model takes: the model, its tokenizer, the device."""

    model: PeftModel
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    model_dir: Path


def bring_up(cfg: FedConfig, num_labels: int, model_dir: Path | None = None) -> ModelParts:
    """The run's PEFT model at its seeded initialisation, its tokenizer and device.

    ``model_dir`` is the base model's folder (default: ``cfg.base_model`` resolved; a site passes
    the copy whose fingerprint it checked).
    """
    folder = model_dir if model_dir is not None else resolve_base(cfg)
    return ModelParts(
        model=build_peft_model(PeftSpec.from_config(cfg, folder, num_labels)),
        tokenizer=load_tokenizer(folder),
        device=select_device(cfg.device),
        model_dir=folder,
    )


def trainable_counts(model: torch.nn.Module) -> tuple[int, int]:
    """Return ``(trainable, total)`` parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def head_layer(model: torch.nn.Module) -> torch.nn.Linear:
    """The trainable classifier head of a PEFT sequence classifier (peft's ``modules_to_save`` copy)."""
    heads = [
        m.modules_to_save[m.active_adapter] for m in model.modules() if isinstance(m, ModulesToSaveWrapper)
    ]
    linear = [h for h in heads if isinstance(h, torch.nn.Linear)]
    if len(linear) != 1:
        raise ValueError(
            f"head_layer: expected one trainable linear classifier head, found {len(linear)}; a head "
            "exists only for a sequence-classification task."
        )
    return linear[0]


@contextmanager
def frozen_head(model: torch.nn.Module, frozen: bool = True) -> Iterator[None]:
    """Within the block, ``model``'s classifier head (:func:`head_layer`) takes no gradient (``frozen``).

    Its parameters count as frozen there, so :func:`frozen_state_fingerprint` covers them; they are
    trainable again after the block, however it ends. ``frozen=False``: nothing changes.
    """
    params = list(head_layer(model).parameters()) if frozen else []
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def frozen_state_fingerprint(model: torch.nn.Module) -> str:
    """Fingerprint of every non-trainable tensor in ``model`` (the frozen base), to prove it never changes."""
    return hash_tensors({n: p for n, p in model.named_parameters() if not p.requires_grad})


def base_model_nbytes(model_dir: Path) -> int:
    """Bytes of the full base checkpoint (what full fine-tuning would exchange per round)."""
    return sum(t.numel() * t.element_size() for t in checkpoint_tensors(model_dir).values())
