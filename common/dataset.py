"""The examples every fedtune site and the coordinator train and score on."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)
class TextDataset:
    """Texts with integer class ids, as every fedtune site and the server see them.

    Attributes
    ----------
    texts
        One input text per example.
    labels
        Class id of each example (read-only int64 array of shape ``(n,)``).
    label_names
        Class names; index = class id. Fixed per task, so all sites share the same ids.
    serialisation
        How each text was built, e.g. ``column `long_name```.
    source
        File (or package file) the examples came from.
    targets
        Generative tasks: the answer to each text (e.g. its ICD-10-CM code); empty for classification.
        The labels then only group the examples (e.g. by chapter, for label skew across sites).
    answer_codes
        Generative tasks whose answers are codes (``icd10-code``): every valid code, normalised
        (:func:`~fedtune.common.icd10.normalise_code`); empty = free-text answers.
    """

    texts: tuple[str, ...]
    labels: np.ndarray
    label_names: tuple[str, ...]
    serialisation: str
    source: str
    targets: tuple[str, ...] = ()
    answer_codes: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        labels = np.array(self.labels, dtype=np.int64)
        if labels.shape != (len(self.texts),):
            raise ValueError(f"TextDataset: labels have shape {labels.shape}, expected ({len(self.texts)},).")
        if labels.size and (labels.min() < 0 or labels.max() >= len(self.label_names)):
            raise ValueError(
                f"TextDataset: class ids must be in 0..{len(self.label_names) - 1} "
                f"(one per label name), got {labels.min()}..{labels.max()}."
            )
        if self.targets and len(self.targets) != len(self.texts):
            raise ValueError(f"TextDataset: {len(self.targets)} targets for {len(self.texts)} texts.")
        labels.setflags(write=False)
        object.__setattr__(self, "labels", labels)

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: np.ndarray) -> TextDataset:
        """Return the examples at ``indices`` (in that order), with the same label names."""
        idx = np.asarray(indices, dtype=np.int64)
        return dataclasses.replace(
            self,
            texts=tuple(self.texts[i] for i in idx),
            labels=self.labels[idx],
            targets=tuple(self.targets[i] for i in idx) if self.targets else (),
        )

    @property
    def generative(self) -> bool:
        """Whether the examples are prompts with answers to generate (else texts with class ids)."""
        return bool(self.targets)
