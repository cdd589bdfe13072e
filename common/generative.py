"""Generative tasks on a causal language model: prompts, response-only loss, greedy answers and scores.

A generative :class:`~fedtune.common.dataset.TextDataset` holds prompts (``texts``, the task's
template already applied: :mod:`fedtune.common.prompts`) and answers (``targets``). Training sees
``prompt + answer + EOS`` and learns the answer tokens only (the prompt's and the padding's labels
are ``-100``); scoring generates each answer greedily and compares it with the target:
``exact_match`` (the whole answer); for code answers (``answer_codes``: ICD-10-CM) also
``category_match`` (the first three characters, the ICD-10 category) and ``valid_code`` (the share
of answers that are codes at all).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from .dataset import TextDataset
from .icd10 import normalise_code

IGNORE = -100  # label of a token the loss skips (prompt, padding)
CATEGORY_CHARS = 3  # an ICD-10-CM category is a code's first three characters


def _answer_ids(tokenizer: PreTrainedTokenizerBase, prompt: str, target: str) -> list[int]:
    """The answer's tokens and EOS; a space separates it from a prompt that does not end in one."""
    joined = target if prompt[-1:].isspace() else " " + target
    return [*tokenizer(joined, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]


def _prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: str, max_length: int) -> list[int]:
    """The prompt's last ``max_length`` tokens: a long text loses its start, never the cue before the answer.

    Training and generation both cut here, so an answer is generated from the context it was trained on.
    """
    return tokenizer(prompt)["input_ids"][-max_length:]


def encode_pairs(
    tokenizer: PreTrainedTokenizerBase, prompts: list[str], targets: list[str], max_length: int
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Right-padded ``prompt + answer + EOS`` rows and their labels (``-100`` but on the answer).

    ``max_length`` bounds the prompt (its last tokens kept, as :func:`generate` keeps them) and, on its
    own, the answer with its EOS (its end cut).
    """
    rows: list[tuple[list[int], list[int]]] = []
    for prompt, target in zip(prompts, targets, strict=True):
        answer = _answer_ids(tokenizer, prompt, target)[:max_length]
        head = _prompt_ids(tokenizer, prompt, max_length)
        rows.append((head + answer, [IGNORE] * len(head) + answer))
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows])
    mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows])
    labels = torch.tensor([lab + [IGNORE] * (width - len(lab)) for _, lab in rows])
    return {"input_ids": input_ids, "attention_mask": mask}, labels


def answer_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each example's mean next-token cross-entropy on its answer tokens, and whether it has any.

    Returns ``(losses, counted)``, both of shape ``(batch,)``; an example without answer tokens
    (all cut off by ``max-length``) has loss 0 and ``counted`` False.
    """
    shifted = logits[:, :-1].float()
    target = labels[:, 1:]
    tokens = torch.nn.functional.cross_entropy(
        shifted.reshape(-1, shifted.shape[-1]), target.reshape(-1), ignore_index=IGNORE, reduction="none"
    ).view(target.shape)
    counted = (target != IGNORE).sum(dim=1)
    return tokens.sum(dim=1) / counted.clamp(min=1), counted > 0


def causal_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over examples of each example's mean next-token cross-entropy on its answer tokens.

    Averaging per example first keeps one example one unit (what DP-SGD clips), however long its answer.
    """
    losses, counted = answer_losses(logits, labels)
    return losses[counted].mean()


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    *,
    max_new_tokens: int,
    max_length: int,
    device: torch.device,
) -> list[str]:
    """Greedy answers to ``prompts`` (one batch, left-padded), each cut at EOS and its first line."""
    heads = [_prompt_ids(tokenizer, p, max_length) for p in prompts]
    width = max(len(h) for h in heads)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(h)) + h for h in heads], device=device)
    mask = torch.tensor([[0] * (width - len(h)) + [1] * len(h) for h in heads], device=device)
    out = model.generate(
        input_ids=input_ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad,
        eos_token_id=tokenizer.eos_token_id,
    )
    texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return [(text.strip().splitlines() or [""])[0].strip() for text in texts]


@dataclass(frozen=True)
class GenerationResult:
    """Scores of generated answers on one dataset (``category_match``/``valid_code``: code answers)."""

    loss: float  # the answer tokens' cross-entropy (teacher-forced)
    exact_match: float
    category_match: float | None
    valid_code: float | None
    examples: int

    def as_metrics(self) -> dict[str, float]:
        """Flat metric dict (the code scores only when defined)."""
        out = {"loss": self.loss, "exact_match": self.exact_match}
        if self.category_match is not None and self.valid_code is not None:
            out |= {"category_match": self.category_match, "valid_code": self.valid_code}
        return out


def score_answers(answers: list[str], targets: tuple[str, ...], codes: frozenset[str]) -> dict[str, float]:
    """Exact match; with ``codes`` (the valid answers) also category match and the valid share.

    Codes compare in :func:`~fedtune.common.icd10.normalise_code` form; other answers whitespace-trimmed.
    """
    if not answers:
        raise ValueError("Cannot score an empty dataset.")
    pairs = list(zip(answers, targets, strict=True))
    if not codes:
        return {"exact_match": float(np.mean([a.strip() == t.strip() for a, t in pairs]))}
    said = [normalise_code(a) for a in answers]
    truth = [normalise_code(t) for t in targets]
    return {
        "exact_match": float(np.mean([a == t for a, t in zip(said, truth, strict=True)])),
        "category_match": float(
            np.mean([a[:CATEGORY_CHARS] == t[:CATEGORY_CHARS] for a, t in zip(said, truth, strict=True)])
        ),
        "valid_code": float(np.mean([a in codes for a in said])),
    }


def result(loss: float, answers: list[str], ds: TextDataset) -> GenerationResult:
    """The :class:`GenerationResult` of ``answers`` to ``ds`` with teacher-forced ``loss``."""
    scores = score_answers(answers, ds.targets, ds.answer_codes)
    assert math.isfinite(loss)
    return GenerationResult(
        loss=loss,
        exact_match=scores["exact_match"],
        category_match=scores.get("category_match"),
        valid_code=scores.get("valid_code"),
        examples=len(answers),
    )
