"""Canary patients for the membership-inference audit.

``audit-canaries=m`` makes ``m`` synthetic patient records (seeded by the run's ``seed``):
each is a random mix of clinical words with a random record id and a random label, so
nothing but memorisation can predict its label. Each canary is planted in site 0's
training data independently with probability 1/2; the audit then asks, from the shared
adapter alone, which canaries were trained on (Steinke, Nasr and Jagielski 2023).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .data import TextDataset

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


def make_canaries(count: int, label_names: tuple[str, ...], seed: int) -> Canaries:
    """``count`` seeded canary records over ``label_names``, each a member with probability 1/2."""
    rng = np.random.default_rng([seed, 0xCA7A])
    texts = tuple(
        f"Patient record {rng.integers(10**6, 10**7)}-{chr(65 + rng.integers(26))}: "
        + " ".join(rng.choice(_WORDS, size=8))
        for _ in range(count)
    )
    labels = rng.integers(0, len(label_names), size=count)
    records = TextDataset(
        texts=texts,
        labels=labels,
        label_names=label_names,
        serialisation="synthetic canary record",
        source=f"fedtune canaries (seed {seed})",
    )
    return Canaries(records=records, members=rng.random(count) < 0.5)


def with_members(train: TextDataset, canaries: Canaries) -> TextDataset:
    """``train`` plus the member canaries (appended; nothing else changes)."""
    members = canaries.records.subset(np.flatnonzero(canaries.members))
    return TextDataset(
        texts=train.texts + members.texts,
        labels=np.concatenate([train.labels, members.labels]),
        label_names=train.label_names,
        serialisation=train.serialisation,
        source=f"{train.source} + {len(members)} canaries",
    )
