"""The valid values of every run-config option that takes one of a set: one registry per kind.

The run config's validation (:mod:`fedtune.common.config`), ``fedtune config`` (the table of every
key) and the README table read these; the code that implements each value (the strategies of
:mod:`fedtune.server.strategy`, the PEFT builders of :mod:`fedtune.common.model`, the tasks of
:mod:`fedtune.common.data`, the partitioners of :mod:`fedtune.common.partition`) is keyed by the
same names, which the tests check.
"""

from __future__ import annotations

# value -> one line on what it does
STRATEGIES: dict[str, str] = {
    "fedavg": "weighted average of the sites' adapters (McMahan et al. 2017)",
    "fedprox": "FedAvg + the sites' proximal term `fedprox-mu` (Li et al. 2020)",
    "fedavgm": "server SGD with momentum on the averaged update (Hsu et al. 2019)",
    "fedadam": "server Adam on the averaged update (Reddi et al. 2021)",
    "fedyogi": "server Yogi on the averaged update (Reddi et al. 2021)",
}
PEFT_METHODS: dict[str, str] = {
    "lora": "LoRA adapters on `lora-target-modules` (Hu et al. 2021)",
    "prefix": "prefix tuning, `prefix-virtual-tokens` per layer (Li & Liang 2021)",
}
LORA_VARIANTS: dict[str, str] = {
    "standard": "A and B trained and exchanged",
    "ffa": "FFA-LoRA: A frozen at the shared seeded init, only B trained and exchanged (exact average)",
}
TASKS: dict[str, str] = {
    "icd10-chapter": "ICD-10-CM diagnosis description -> its chapter (packaged CMS table)",
    "diabetes": "Pima diabetes rows as text -> diabetes yes/no (packaged table)",
    "csv": "the user's own CSV/JSONL file (`data-path`, `text-column`, `label-column`)",
}
PARTITIONERS: dict[str, str] = {
    "iid": "stratified: every site gets the same label mix",
    "dirichlet": "label skew: each label spread over sites by Dirichlet(`dirichlet-alpha`)",
    "specialty": "each site holds `specialty-share` of its examples from `specialty-labels` own labels",
}
LABEL_SKEW: dict[str, str] = {
    "none": "plain cross-entropy",
    "logit-adjust": "logits + `logit-adjust-tau` * log(site's label prior) in the loss (Menon et al. 2021)",
    "restricted-softmax": "logits of labels absent at the site scaled by `restricted-softmax-alpha` (FedRS)",
}
LR_SCHEDULES: dict[str, str] = {
    "constant": "the peak rate throughout",
    "cosine": "warm-up over `lr-warmup` of the run's local steps, then cosine decay to 0",
}
DEVICES: dict[str, str] = {
    "auto": "CUDA when available, else CPU",
    "cpu": "CPU",
    "cuda": "the first CUDA GPU",
}
DP_MODES: dict[str, str] = {
    "off": "no differential privacy",
    "distributed": "client-level: each site clips and adds its share of the noise before SecAgg+",
    "central": "client-level: sites clip, the server adds the noise (Flower's client-side-clipping wrapper)",
    "example": "patient-level: each site trains with DP-SGD (Opacus); the privacy unit is one record",
    "example+distributed": "patient-level DP-SGD and client-level distributed DP, both accounted",
    "example+central": "patient-level DP-SGD and client-level central DP, both accounted",
}
ACCOUNTANTS: dict[str, str] = {
    "rdp": "dp-accounting's Renyi-DP accountant",
    "pld": "dp-accounting's privacy-loss-distribution accountant (tighter, slower)",
}
