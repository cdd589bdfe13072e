"""Audit canaries: seeded records, planted at site 0, for classification and generative tasks."""

from __future__ import annotations

import re

import numpy as np
import pytest
from fedtune.common.canaries import CANARY_SITE, make_canaries, run_canaries, with_members
from fedtune.common.config import parse_run_config
from fedtune.common.dataset import TextDataset
from fedtune.common.prompts import PROMPTS

LABELS = ("A00-B99", "C00-D49", "E00-E89")
TEMPLATE = "Diagnosis: {text}\nCode:"


def _train(generative: bool) -> TextDataset:
    return TextDataset(
        texts=("cholera", "anemia"),
        labels=np.array([0, 2]),
        label_names=LABELS,
        serialisation="test",
        source="test",
        targets=("A00.0", "D64.9") if generative else (),
    )


def test_generative_canaries_get_random_code_answers_in_the_prompt_and_the_same_membership() -> None:
    plain = make_canaries(50, LABELS, seed=7)
    generative = make_canaries(50, LABELS, seed=7, template=TEMPLATE)

    assert not plain.records.generative and generative.records.generative
    assert all(re.fullmatch(r"[A-Z]\d\d\.\d\d", t) for t in generative.records.targets)
    assert len(set(generative.records.targets)) > 45  # random, not one answer for all
    assert generative.records.texts == tuple(TEMPLATE.replace("{text}", t) for t in plain.records.texts)
    # the classification canaries are unchanged by the generative option: same records, same members
    assert np.array_equal(generative.members, plain.members)
    assert np.array_equal(generative.records.labels, plain.records.labels)
    assert make_canaries(50, LABELS, seed=8, template=TEMPLATE).records.targets != generative.records.targets


@pytest.mark.parametrize("generative", [False, True])
def test_only_the_members_join_the_training_data_with_their_answers(generative: bool) -> None:
    canaries = make_canaries(20, LABELS, seed=1, template=TEMPLATE if generative else "")
    train = with_members(_train(generative), canaries)
    members = np.flatnonzero(canaries.members)
    assert len(train) == 2 + len(members)
    assert train.texts[2:] == tuple(canaries.records.texts[i] for i in members)
    assert list(train.labels[2:]) == list(canaries.records.labels[members])
    if generative:
        assert train.targets[:2] == ("A00.0", "D64.9")
        assert train.targets[2:] == tuple(canaries.records.targets[i] for i in members)


def test_canaries_of_another_kind_than_the_data_are_refused() -> None:
    with pytest.raises(ValueError, match="both must be generative or neither"):
        with_members(_train(False), make_canaries(4, LABELS, seed=1, template=TEMPLATE))


def test_the_runs_canaries_follow_its_task_and_prompt_template() -> None:
    classify = parse_run_config({"audit-canaries": 6})
    code = parse_run_config({"task": "icd10-code", "label-skew": "none", "audit-canaries": 6})
    custom = parse_run_config(
        {"task": "icd10-code", "label-skew": "none", "audit-canaries": 6, "prompt-template": TEMPLATE}
    )
    assert not run_canaries(classify, LABELS).records.generative
    assert run_canaries(code, LABELS).records.texts[0].startswith(PROMPTS["icd10-code"].split("{text}")[0])
    assert run_canaries(custom, LABELS).records.texts[0].startswith("Diagnosis: Patient record")
    assert CANARY_SITE == 0


def test_each_canary_is_a_member_with_probability_one_half() -> None:
    share = make_canaries(4000, LABELS, seed=3).members.mean()
    assert abs(share - 0.5) < 0.03  # 4 standard errors of a fair coin over 4,000 canaries
