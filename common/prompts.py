"""The prompt templates of the generative tasks, and putting a dataset's texts in one (torch-free)."""

from __future__ import annotations

import dataclasses

from .dataset import TextDataset

# task -> its prompt around `{text}` (run-config `prompt-template` overrides it)
PROMPTS: dict[str, str] = {
    "icd10-code": "Diagnosis: {text}\nICD-10-CM code:",
    "instructions": "### Instruction:\n{text}\n\n### Response:\n",
}


def template_of(task: str, prompt_template: str = "") -> str:
    """The prompt template of ``task``: ``prompt_template`` when set, else the task's own."""
    return prompt_template or PROMPTS[task]


def apply_template(ds: TextDataset, template: str) -> TextDataset:
    """``ds`` with each text put in ``template`` at ``{text}`` (other braces stay as they are)."""
    return dataclasses.replace(
        ds,
        texts=tuple(template.replace("{text}", text) for text in ds.texts),
        serialisation=f"{ds.serialisation} in the prompt {template!r}",
    )
