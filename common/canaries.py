"""Canary patients for the membership-inference audit.

``audit-canaries=m`` makes ``m`` synthetic patient records (seeded by the run's ``seed``):
each is a random mix of clinical words with a random record id and a random label, so
nothing but memorisation can predict its label. For a generative task each canary also gets a
random code-shaped answer (``K47.38``) to generate, and its text is put in the run's prompt
template, as the task's own examples are. Each canary is planted in site 0's training data
independently with probability 1/2; the audit then asks, from the shared adapter alone, which
canaries were trained on (Steinke, Nasr and Jagielski 2023).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from .config import FedConfig
from .dataset import TextDataset
from .options import GENERATIVE_TASKS
from .prompts import apply_template, template_of

CANARY_SITE = 0  # the simulated hospital whose training data receives the member canaries
_WORDS = (
    "acute chronic bilateral left right upper lower recurrent mild severe episode fracture infection "
    "lesion syndrome disorder pain swelling fever cough nausea rash anemia edema stenosis ulcer "
    "tremor seizure hypertension diabetes asthma sepsis hernia cyst nodule polyp arrhythmia "
    "dermatitis neuropathy retinopathy nephropathy abscess contusion laceration sprain dislocation"
).split()


@dataclass(frozen=True)
class Canaries:
    """The canary records and which of them were trained on."""

    records: TextDataset
    members: np.ndarray  # bool, shape (m,): planted in site 0's training data


def make_canaries(count: int, label_names: tuple[str, ...], seed: int, template: str = "") -> Canaries:
    """``count`` seeded canary records over ``label_names``, each a member with probability 1/2.

    ``template``: a generative task's prompt template (:func:`~fedtune.common.prompts.apply_template`);
    each canary then has a random code-shaped answer. Empty: classification canaries (labels only).
    """
    rng = np.random.default_rng([seed, 0xCA7A])
    texts = tuple(
        f"Patient record {rng.integers(10**6, 10**7)}-{chr(65 + rng.integers(26))}: "
        + " ".join(rng.choice(_WORDS, size=8))
        for _ in range(count)
    )
    labels = rng.integers(0, len(label_names), size=count)
    members = rng.random(count) < 0.5
    records = TextDataset(
        texts=texts,
        labels=labels,
        label_names=label_names,
        serialisation="synthetic canary record",
        source=f"fedtune canaries (seed {seed})",
        targets=tuple(_code(rng) for _ in range(count)) if template else (),
    )
    return Canaries(records=apply_template(records, template) if template else records, members=members)


def _code(rng: np.random.Generator) -> str:
    """A random ICD-10-shaped answer: a capital letter, two digits, a dot, two digits."""
    digits = rng.integers(0, 10, size=4)
    return f"{chr(65 + rng.integers(26))}{digits[0]}{digits[1]}.{digits[2]}{digits[3]}"


def run_canaries(cfg: FedConfig, label_names: tuple[str, ...]) -> Canaries:
    """The run's ``audit-canaries`` canaries (in the task's prompt template when it is generative)."""
    template = template_of(cfg.task, cfg.prompt_template) if cfg.task in GENERATIVE_TASKS else ""
    return make_canaries(cfg.audit_canaries, label_names, cfg.seed, template)


def with_members(train: TextDataset, canaries: Canaries) -> TextDataset:
    """``train`` plus the member canaries (appended; nothing else changes)."""
    members = canaries.records.subset(np.flatnonzero(canaries.members))
    if train.generative != members.generative:
        raise ValueError("Canaries and training data differ in kind: both must be generative or neither.")
    return dataclasses.replace(
        train,
        texts=train.texts + members.texts,
        labels=np.concatenate([train.labels, members.labels]),
        targets=train.targets + members.targets,
        source=f"{train.source} + {len(members)} canaries",
    )
