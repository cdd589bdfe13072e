"""Tests of fedtune.common.generative: prompt + answer rows, the answer-only loss, greedy answers, scores,
and training and scoring a tiny causal LM end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from fedtune.common.config import FedConfig
from fedtune.common.data import load_task
from fedtune.common.dataset import TextDataset
from fedtune.common.generative import (
    IGNORE,
    GenerationResult,
    answer_losses,
    causal_loss,
    encode_pairs,
    generate,
    score_answers,
)
from fedtune.common.icd10 import normalise_code
from fedtune.common.model import ModelParts, bring_up, load_tokenizer
from fedtune.common.prompts import PROMPTS, apply_template, template_of
from fedtune.common.train import evaluate, train
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

CPU = torch.device("cpu")
CHOLERA = "Diagnosis: Cholera, unspecified\nICD-10-CM code:"
# prompts of different token lengths (left padding in one batch)
PROMPTS_OF_LENGTHS = [
    CHOLERA,
    "Diagnosis: Typhoid fever with heart involvement\nICD-10-CM code:",
    "Diagnosis: Salmonella meningitis\nICD-10-CM code:",
    "Diagnosis: Displaced dome fracture of unspecified acetabulum, initial encounter for open fracture\n"
    "ICD-10-CM code:",
]
ALL_LINEAR = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tokenizer(tiny_causal_lm: Path) -> PreTrainedTokenizerBase:
    return load_tokenizer(tiny_causal_lm)


@pytest.fixture(scope="module")
def scrambled(tiny_causal_lm: Path) -> PreTrainedModel:
    """The tiny LM with every weight matrix redrawn at std 0.3: the conftest one (std 0.02) only repeats
    the prompt's last token, whatever came before; this one's answers depend on every prompt token and
    its position, so a padding or position mistake changes them."""
    model = AutoModelForCausalLM.from_pretrained(tiny_causal_lm).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


def _ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _dataset(texts: list[str], targets: list[str], codes: frozenset[str] = frozenset()) -> TextDataset:
    return TextDataset(
        texts=tuple(texts),
        labels=np.zeros(len(texts), dtype=np.int64),
        label_names=("all",),
        serialisation="column `text`",
        source="test",
        targets=tuple(targets),
        answer_codes=codes,
    )


# ---- encode_pairs ---------------------------------------------------------------------------------------


def test_encode_pairs_learns_the_answer_and_eos_only(tokenizer: PreTrainedTokenizerBase) -> None:
    # Prepare
    prompts = [CHOLERA, "Diagnosis: Typhoid fever with heart involvement\nICD-10-CM code:"]
    targets = ["A00.9", "A01.02"]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    heads = [tokenizer(p)["input_ids"] for p in prompts]
    answers = [_ids(tokenizer, " " + t) + [eos] for t in targets]
    lengths = [len(h) + len(a) for h, a in zip(heads, answers, strict=True)]
    assert lengths[0] != lengths[1]  # one row is padded

    # Execute
    inputs, labels = encode_pairs(tokenizer, prompts, targets, max_length=64)

    # Assert: right-padded to the longest row; prompt and padding ignored; the answer then EOS learned
    width = max(lengths)
    assert IGNORE == -100
    assert inputs["input_ids"].shape == labels.shape == inputs["attention_mask"].shape == (2, width)
    for row, (head, answer, n) in enumerate(zip(heads, answers, lengths, strict=True)):
        assert inputs["input_ids"][row].tolist() == head + answer + [pad] * (width - n)
        assert labels[row].tolist() == [-100] * len(head) + answer + [-100] * (width - n)
        assert inputs["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)
        learned = labels[row][labels[row] != IGNORE]
        assert tokenizer.decode(learned) == f" {targets[row]}{tokenizer.eos_token}"


@pytest.mark.parametrize("max_length", [1, 3, 8])
def test_a_prompt_over_max_length_loses_its_start_and_keeps_the_whole_answer(
    tokenizer: PreTrainedTokenizerBase, max_length: int
) -> None:
    # Prepare: a prompt longer than max_length, an answer within it
    head = tokenizer(CHOLERA)["input_ids"]
    answer = _ids(tokenizer, " A00.9") + [tokenizer.eos_token_id]
    assert len(head) > max_length and len(answer) <= max(max_length, 8)

    # Execute
    inputs, labels = encode_pairs(tokenizer, [CHOLERA], ["A00.9"], max_length=max_length)

    # Assert: the prompt's last max_length tokens (its cue), then the answer (itself cut at max_length)
    kept = answer[:max_length]
    assert inputs["input_ids"][0].tolist() == head[-max_length:] + kept
    assert labels[0].tolist() == [-100] * max_length + kept
    assert inputs["attention_mask"][0].tolist() == [1] * (max_length + len(kept))


def test_an_answer_longer_than_max_length_loses_its_end(tokenizer: PreTrainedTokenizerBase) -> None:
    # Prepare
    answer = _ids(tokenizer, " S06.335A") + [tokenizer.eos_token_id]
    assert len(answer) > 4

    # Execute
    inputs, labels = encode_pairs(tokenizer, [CHOLERA], ["S06.335A"], max_length=4)

    # Assert: the prompt's last four tokens, then the answer's first four
    assert inputs["input_ids"][0].tolist() == tokenizer(CHOLERA)["input_ids"][-4:] + answer[:4]
    assert labels[0].tolist() == [-100] * 4 + answer[:4]


@pytest.mark.parametrize(
    ("prompt", "joined"),
    [
        ("Diagnosis: cholera\nICD-10-CM code:", " A00.9"),
        ("Diagnosis: cholera\nICD-10-CM code: ", "A00.9"),
        ("### Instruction:\ncholera\n\n### Response:\n", "A00.9"),
    ],
)
def test_the_answer_is_spaced_from_a_prompt_not_ending_in_whitespace(
    tokenizer: PreTrainedTokenizerBase, prompt: str, joined: str
) -> None:
    # Prepare / Execute
    inputs, labels = encode_pairs(tokenizer, [prompt], ["A00.9"], max_length=64)

    # Assert
    eos = tokenizer.eos_token
    assert tokenizer.decode(labels[0][labels[0] != IGNORE]) == joined + eos
    assert tokenizer.decode(inputs["input_ids"][0]) == prompt + joined + eos


# ---- causal_loss ----------------------------------------------------------------------------------------


def _hand_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each example's mean of -log p(label at t | logits at t-1) over its answer tokens, then their mean."""
    per_example = []
    for row_logits, row_labels in zip(logits, labels, strict=True):
        terms = [
            -torch.log_softmax(row_logits[t - 1], dim=-1)[row_labels[t]]
            for t in range(1, len(row_labels))
            if row_labels[t] != IGNORE
        ]
        if terms:
            per_example.append(torch.stack(terms).mean())
    return torch.stack(per_example).mean()


def test_causal_loss_is_the_shifted_cross_entropy_on_answer_tokens() -> None:
    # Prepare: a label at position 0 has no logit before it and is never scored
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 5, generator=gen, requires_grad=True)
    labels = torch.tensor(
        [
            [-100, -100, 2, 4, -100, -100],
            [3, -100, 0, 3, 3, 1],
            [-100, -100, -100, -100, 1, -100],
        ]
    )

    # Execute
    loss = causal_loss(logits, labels)
    loss.backward()

    # Assert: the hand value; only the logits that predict an answer token get a gradient
    assert loss.item() == pytest.approx(_hand_loss(logits.detach(), labels).item(), rel=1e-6)
    predicts_answer = torch.zeros(3, 6, dtype=torch.bool)
    predicts_answer[:, :-1] = labels[:, 1:] != IGNORE
    assert logits.grad is not None
    assert (logits.grad[predicts_answer].abs().sum(dim=-1) > 0).all()
    assert (logits.grad[~predicts_answer] == 0).all()


def test_causal_loss_weighs_each_example_once_whatever_its_answer_length() -> None:
    # Prepare: example 0 has one answer token at uniform odds (loss log 4), example 1 four certain ones
    logits = torch.zeros(2, 5, 4)
    labels = torch.tensor([[-100, -100, -100, -100, 2], [-100, 1, 1, 1, 1]])
    logits[1, :4, 1] = 100.0

    # Execute
    loss = causal_loss(logits, labels).item()

    # Assert: (log 4 + 0) / 2 per example, not (log 4 + 4 * 0) / 5 per token
    assert loss == pytest.approx(np.log(4) / 2, rel=1e-6)


def test_causal_loss_skips_an_example_without_answer_tokens() -> None:
    # Prepare
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 5, generator=gen)
    labels = torch.tensor([[-100, 1, 2, -100], [-100, -100, -100, -100]])

    # Execute
    both = causal_loss(logits, labels)
    alone = causal_loss(logits[:1], labels[:1])

    # Assert
    assert torch.isfinite(both)
    assert both.item() == pytest.approx(alone.item(), rel=1e-6)


# ---- score_answers --------------------------------------------------------------------------------------


def test_score_answers_compares_normalised_codes_their_category_and_validity() -> None:
    # Prepare: (exact, category, valid) = (yes, yes, yes), (no, yes, no), (no, yes, no), (no, no, yes);
    # the category is the first 3 characters: `A00` shares it with `A00.0`
    answers = [" a0 0.0 ", "A00.7", "a00", "B99"]
    targets = ("A00.0", "A00.9", "A00.0", "A00.0")
    codes = frozenset({"A00.0", "A00.9", "B99"})

    # Execute
    scores = score_answers(answers, targets, codes)

    # Assert
    assert scores == {"exact_match": 0.25, "category_match": 0.75, "valid_code": 0.5}


def test_score_answers_on_free_text_is_whitespace_trimmed_exact_match_only() -> None:
    # Prepare
    answers = [" Yes ", "no", "a00.0", "Take two tablets daily."]
    targets = ("Yes", "No", "A00.0", " Take two tablets daily.\n")

    # Execute
    scores = score_answers(answers, targets, frozenset())

    # Assert: case counts in free text; whitespace around the answer does not
    assert scores == {"exact_match": 0.5}


def test_score_answers_refuses_no_answers() -> None:
    # Prepare / Execute / Assert
    with pytest.raises(ValueError, match="empty"):
        score_answers([], (), frozenset({"A00.0"}))


# ---- templates ------------------------------------------------------------------------------------------


def test_template_of_is_the_run_configs_template_else_the_tasks_own() -> None:
    # Prepare / Execute / Assert
    assert template_of("icd10-code") == PROMPTS["icd10-code"] == "Diagnosis: {text}\nICD-10-CM code:"
    assert template_of("instructions") == PROMPTS["instructions"]
    assert "{text}" in PROMPTS["instructions"]
    assert template_of("icd10-code", "Code for {text}:") == "Code for {text}:"
    assert template_of("instructions", "Q: {text}\nA:") == "Q: {text}\nA:"


def test_apply_template_puts_each_text_at_its_marker_and_keeps_other_braces() -> None:
    # Prepare
    ds = _dataset(["fever {severe}", "note {text} here"], ["R50.9", "R05.9"], frozenset({"R50.9", "R05.9"}))
    template = '{"json": 1} Diagnosis: {text} -> {code}:'

    # Execute
    out = apply_template(ds, template)

    # Assert: braces of the template and of the texts stay; answers, labels and codes are untouched
    assert out.texts == (
        '{"json": 1} Diagnosis: fever {severe} -> {code}:',
        '{"json": 1} Diagnosis: note {text} here -> {code}:',
    )
    assert out.targets == ds.targets and out.answer_codes == ds.answer_codes
    assert out.labels.tolist() == ds.labels.tolist() and out.source == ds.source
    assert out.serialisation == f"column `text` in the prompt {template!r}"
    assert ds.texts == ("fever {severe}", "note {text} here")  # the input is not changed


# ---- generate -------------------------------------------------------------------------------------------


class _Scripted(torch.nn.Module):
    """A model whose ``generate`` appends fixed replies to the prompts and records what it was given."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, replies: list[str]) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.replies = replies
        self.calls: list[dict] = []

    def generate(self, *, input_ids: torch.Tensor, **kwargs: object) -> torch.Tensor:
        self.calls.append({"input_ids": input_ids, **kwargs})
        new = [_ids(self.tokenizer, reply) for reply in self.replies]
        width = max(len(ids) for ids in new)
        pad = self.tokenizer.pad_token_id
        tail = torch.tensor([ids + [pad] * (width - len(ids)) for ids in new])
        return torch.cat([input_ids, tail], dim=1)


def test_generate_left_pads_the_prompts_and_keeps_each_answers_first_line(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    # Prepare
    prompts = ["Diagnosis: Cholera\nICD-10-CM code:", "x", CHOLERA, "Diagnosis: Shigellosis\ncode:"]
    replies = [" A00.9\nB01.1\n", "\n  A01.0 \nmore", "\n \n", " K35.80<eos><pad><pad>"]
    model = _Scripted(tokenizer, replies)
    heads = [tokenizer(p)["input_ids"] for p in prompts]
    width = max(len(h) for h in heads)
    pad = tokenizer.pad_token_id

    # Execute
    answers = generate(model, tokenizer, prompts, max_new_tokens=7, max_length=64, device=CPU)

    # Assert: the prompt is not part of the answer; EOS, padding and every line after the first dropped
    assert answers == ["A00.9", "A01.0", "", "K35.80"]
    (call,) = model.calls
    assert call["input_ids"].tolist() == [[pad] * (width - len(h)) + h for h in heads]
    assert call["attention_mask"].tolist() == [[0] * (width - len(h)) + [1] * len(h) for h in heads]
    assert call["max_new_tokens"] == 7 and call["do_sample"] is False
    assert call["pad_token_id"] == pad and call["eos_token_id"] == tokenizer.eos_token_id


def test_generate_keeps_the_end_of_a_prompt_over_max_length(tokenizer: PreTrainedTokenizerBase) -> None:
    # Prepare
    long_prompt = PROMPTS_OF_LENGTHS[-1]
    head = tokenizer(long_prompt)["input_ids"]
    assert len(head) > 12
    model = _Scripted(tokenizer, [" A00.9", " S32.0"])

    # Execute
    generate(model, tokenizer, [long_prompt, "x"], max_new_tokens=4, max_length=12, device=CPU)

    # Assert
    ids = model.calls[0]["input_ids"]
    assert ids.shape == (2, 12)
    assert ids[0].tolist() == head[-12:]


def test_generation_sees_the_prompt_tokens_training_saw(tokenizer: PreTrainedTokenizerBase) -> None:
    # Prepare
    long_prompt, target = PROMPTS_OF_LENGTHS[-1], "S32.483B"
    inputs, labels = encode_pairs(tokenizer, [long_prompt], [target], max_length=24)
    trained_on = inputs["input_ids"][0][labels[0] == IGNORE].tolist()
    model = _Scripted(tokenizer, [" " + target])

    # Execute
    generate(model, tokenizer, [long_prompt], max_new_tokens=10, max_length=24, device=CPU)

    # Assert
    assert model.calls[0]["input_ids"][0].tolist() == trained_on


def test_a_batch_of_prompts_gets_the_answers_each_prompt_gets_alone(
    scrambled: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> None:
    # Prepare
    assert len({len(tokenizer(p)["input_ids"]) for p in PROMPTS_OF_LENGTHS}) == len(PROMPTS_OF_LENGTHS)
    settings = {"max_new_tokens": 10, "max_length": 64, "device": CPU}

    # Execute
    batch = generate(scrambled, tokenizer, PROMPTS_OF_LENGTHS, **settings)
    alone = [generate(scrambled, tokenizer, [p], **settings)[0] for p in PROMPTS_OF_LENGTHS]

    # Assert: left padding and its mask change nothing; the answers depend on the prompt; one line each
    assert batch == alone
    assert len(set(batch)) == len(batch) and all(batch)
    assert not any("\n" in answer for answer in batch)


# ---- training and scoring a causal LM -------------------------------------------------------------------


def _code_examples(n: int, seed: int) -> TextDataset:
    return apply_template(load_task("icd10-code", max_examples=n, seed=seed), template_of("icd10-code"))


def _parts(base: Path, **peft: object) -> ModelParts:
    cfg = FedConfig(task="icd10-code", label_skew="none", base_model=str(base), **peft)  # type: ignore[arg-type]
    return bring_up(cfg, 22)


def test_lora_on_a_causal_lm_learns_the_answers_it_was_shown(tiny_causal_lm: Path) -> None:
    # Prepare: every prompt fits in max_length (so training and generation see the same prompt)
    parts = _parts(tiny_causal_lm, lora_target_modules=ALL_LINEAR, lora_dropout=0.0)
    ds = _code_examples(8, seed=1)
    settings = {"batch_size": 8, "max_length": 128, "device": CPU}
    assert max(len(parts.tokenizer(t)["input_ids"]) for t in ds.texts) <= 128 - 12
    before = evaluate(parts.model, parts.tokenizer, ds, max_new_tokens=10, **settings)

    # Execute
    result = train(
        parts.model, parts.tokenizer, ds, steps=150, learning_rate=1e-2, weight_decay=0.0, seed=0, **settings
    )
    after = evaluate(parts.model, parts.tokenizer, ds, max_new_tokens=10, **settings)

    # Assert: the tiny LM's tied output embeddings are small (std 0.02), so its logits stay near 0 and the
    # loss cannot fall far below log(vocab); the greedy answers can still all become right
    assert isinstance(before, GenerationResult) and isinstance(after, GenerationResult)
    assert (result.steps, result.examples) == (150, 1200)
    assert before.exact_match == 0.0
    assert after.exact_match >= 0.75
    assert after.category_match is not None and after.category_match >= after.exact_match
    assert after.loss < before.loss - 0.3
    assert result.loss < before.loss


def test_prefix_tuning_trains_a_causal_lm(tiny_causal_lm: Path) -> None:
    # Prepare
    parts = _parts(tiny_causal_lm, peft_method="prefix", lora_target_modules="")
    trainable = {n for n, p in parts.model.named_parameters() if p.requires_grad}
    ds = _code_examples(8, seed=1)
    settings = {"batch_size": 8, "max_length": 128, "device": CPU}
    before = evaluate(parts.model, parts.tokenizer, ds, max_new_tokens=6, **settings)

    # Execute
    train(
        parts.model, parts.tokenizer, ds, steps=100, learning_rate=3e-2, weight_decay=0.0, seed=0, **settings
    )
    after = evaluate(parts.model, parts.tokenizer, ds, max_new_tokens=6, **settings)

    # Assert: only the prefix trains (no head on a causal LM), and it lowers the answers' loss
    assert trainable and all("prompt_encoder" in n for n in trainable)
    assert isinstance(after, GenerationResult) and after.examples == 8
    assert after.loss < before.loss - 0.05


def _generated(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str]) -> list[str]:
    answers = generate(model, tokenizer, prompts, max_new_tokens=6, max_length=48, device=CPU)
    assert len({normalise_code(a)[:3] for a in answers}) == len(answers)  # distinct categories
    assert all(len(normalise_code(a)) >= 3 for a in answers)
    return answers


def test_evaluate_scores_code_answers_with_their_category_and_validity(
    scrambled: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> None:
    # Prepare: targets built from the model's own answers, so the scores are known
    answers = _generated(scrambled, tokenizer, PROMPTS_OF_LENGTHS)
    targets = [answers[0], "A00.0", f" {answers[2].lower()}9", "B99"]
    codes = frozenset({normalise_code(answers[0]), "A00.0", "B99"})
    ds = _dataset(PROMPTS_OF_LENGTHS, targets, codes)
    inputs, labels = encode_pairs(tokenizer, PROMPTS_OF_LENGTHS, targets, max_length=48)
    with torch.no_grad():
        loss = causal_loss(scrambled(**inputs).logits, labels).item()

    # Execute: in batches of 3 and 1
    res = evaluate(scrambled, tokenizer, ds, batch_size=3, max_length=48, device=CPU, max_new_tokens=6)

    # Assert: exact (row 0), category (rows 0 and 2), valid (row 0)
    assert isinstance(res, GenerationResult)
    assert (res.exact_match, res.category_match, res.valid_code, res.examples) == (0.25, 0.5, 0.25, 4)
    assert res.loss == pytest.approx(loss, rel=1e-5)
    assert res.as_metrics() == {
        "loss": res.loss,
        "exact_match": 0.25,
        "category_match": 0.5,
        "valid_code": 0.25,
    }


def test_evaluate_scores_free_text_answers_by_exact_match_only(
    scrambled: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> None:
    # Prepare
    answers = _generated(scrambled, tokenizer, PROMPTS_OF_LENGTHS)
    ds = _dataset(PROMPTS_OF_LENGTHS, [answers[0], "no", f"  {answers[2]}\n", answers[3] + "."])

    # Execute
    res = evaluate(scrambled, tokenizer, ds, batch_size=8, max_length=48, device=CPU, max_new_tokens=6)

    # Assert
    assert isinstance(res, GenerationResult)
    assert (res.exact_match, res.category_match, res.valid_code) == (0.5, None, None)
    assert set(res.as_metrics()) == {"loss", "exact_match"}


def test_answer_losses_are_each_examples_own_and_mark_an_answer_cut_off() -> None:
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 6, 5, generator=gen)
    labels = torch.tensor([[-100, -100, 2, 4, -100, -100], [3, -100, 0, 3, 3, 1], [-100] * 6])
    losses, counted = answer_losses(logits, labels)
    assert counted.tolist() == [True, True, False]
    for i in (0, 1):
        assert losses[i].item() == pytest.approx(
            _hand_loss(logits[i : i + 1], labels[i : i + 1]).item(), rel=1e-6
        )
    assert losses[2].item() == 0.0
