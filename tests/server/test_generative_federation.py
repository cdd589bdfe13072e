"""A generative task federated end to end in process (:mod:`local_grid`) on a tiny causal LM.

The same coordinator, sites, SecAgg+, audit and outputs as classification; what changes is the model
(a causal LM with LoRA or prefix tuning, no head), the loss (answer tokens) and the scores (generated
answers: exact, category and valid-code match).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import fake_task_identity
from fedtune.common.adapters import get_adapter_arrays, nbytes, set_adapter_arrays
from fedtune.common.audit import load_arrays
from fedtune.common.model import base_model_nbytes, load_tokenizer, select_device
from fedtune.common.prompts import PROMPTS
from fedtune.common.sites import coordinator_test_set
from fedtune.common.train import evaluate
from fedtune.server.run_state import RunState
from local_grid import fast_config, run_federation

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GENERATIVE = {
    "task": "icd10-code",
    "label-skew": "none",
    "lora-target-modules": "q_proj,v_proj",
    "max-examples": 300,
    "partitioning": "dirichlet",
    "max-new-tokens": 6,
    "learning-rate": 1e-2,
}
CANARIES = 30


@pytest.fixture(scope="module", autouse=True)
def _task() -> Iterator[None]:
    with fake_task_identity():
        yield


@pytest.fixture(scope="module")
def lora(tmp_path_factory: pytest.TempPathFactory, tiny_causal_lm: Path) -> RunState:
    """3 sites, 2 rounds of LoRA on the tiny causal LM, under SecAgg+, audited with 30 canaries."""
    out = tmp_path_factory.mktemp("generative")
    cfg = fast_config(out, tiny_causal_lm, secure_aggregation=True, audit_canaries=CANARIES, **GENERATIVE)
    return run_federation(cfg)


def test_each_round_records_the_generated_answers_scores_and_no_classifier_scores(lora: RunState) -> None:
    records = lora.rounds.records
    assert [r.round for r in records] == [0, 1, 2]
    for r in records:
        assert r.exact_match is not None and r.category_match is not None and r.valid_code is not None
        assert r.accuracy is None and r.macro_f1 is None
    saved = json.loads(Path(lora.cfg.out_dir, "metrics.json").read_text())
    assert {"exact_match", "category_match", "valid_code"} <= set(saved[-1])
    assert records[-1].train_loss is not None and records[-1].loss < records[0].loss  # it learned something


def test_the_adapter_loads_with_plain_peft_on_the_causal_lm_and_scores_as_recorded(lora: RunState) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    # Prepare: what a user does with OUT/adapter and the base model folder
    cfg = lora.cfg
    base = AutoModelForCausalLM.from_pretrained(cfg.base_model)
    model = PeftModel.from_pretrained(base, Path(cfg.out_dir) / "adapter").eval()

    # Execute
    res = evaluate(
        model,
        load_tokenizer(Path(cfg.base_model)),
        coordinator_test_set(cfg),
        batch_size=cfg.batch_size,
        max_length=cfg.max_length,
        device=select_device("cpu"),
        max_new_tokens=cfg.max_new_tokens,
    )

    # Assert
    last = lora.rounds.records[-1]
    assert (res.loss, res.exact_match, res.category_match) == pytest.approx(
        (last.loss, last.exact_match, last.category_match), abs=1e-5
    )
    meta = json.loads((Path(cfg.out_dir) / "adapter" / "fedtune.json").read_text())
    assert meta["prompt_template"] == PROMPTS["icd10-code"] and meta["max_new_tokens"] == 6
    assert json.loads((Path(cfg.out_dir) / "adapter" / "adapter_config.json").read_text())["task_type"] == (
        "CAUSAL_LM"
    )


def test_only_lora_tensors_leave_a_site_and_the_base_never_changes(lora: RunState) -> None:
    arrays = get_adapter_arrays(lora.shared.model)
    names = [n for n, p in lora.shared.model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    final = load_arrays(Path(lora.cfg.out_dir) / "audit" / "server" / "global-final.npz")[0]
    assert all(np.array_equal(a, b) for a, b in zip(arrays, final, strict=True))
    # each site's masked upload is the adapter's size, a small share of the base model
    upload = max(max(r.bytes_up_per_site.values()) for r in lora.rounds.records[1:])
    assert upload < 0.2 * base_model_nbytes(Path(lora.cfg.base_model))
    assert upload >= nbytes(arrays) // 2  # SecAgg+ quantises; still every adapter value travels


def test_prefix_tuning_federates_on_the_causal_lm(tmp_path: Path, tiny_causal_lm: Path) -> None:
    cfg = fast_config(
        tmp_path, tiny_causal_lm, secure_aggregation=False, peft_method="prefix", audit=False, **GENERATIVE
    )
    coord = run_federation(cfg)
    records = coord.rounds.records
    assert [r.round for r in records] == [0, 1, 2] and records[-1].category_match is not None
    assert records[-1].loss < records[0].loss


def test_patient_level_dp_sgd_trains_the_causal_lm_and_accounts_each_site(
    tmp_path: Path, tiny_causal_lm: Path
) -> None:
    cfg = fast_config(
        tmp_path, tiny_causal_lm, secure_aggregation=False, dp_mode="example", audit=False, **GENERATIVE
    )
    records = run_federation(cfg).rounds.records
    assert [r.round for r in records] == [0, 1, 2]
    assert records[-1].example_dp_epsilon is not None and 0 < records[-1].example_dp_epsilon <= 8.0
    assert sorted(records[-1].sites_example_dp) == ["0", "1", "2"]


def test_the_audit_scores_the_canaries_answers_planted_at_site_0(lora: RunState) -> None:
    from fedtune.common.audit_report import build_report
    from fedtune.common.canaries import run_canaries
    from fedtune.common.sites import simulated_site
    from fedtune.common.train import example_losses

    # the member canaries, with their code-shaped answers, are in site 0's training data only
    canaries = run_canaries(lora.cfg, coordinator_test_set(lora.cfg).label_names)
    members = {
        (canaries.records.texts[i], canaries.records.targets[i]) for i in np.flatnonzero(canaries.members)
    }
    site0 = simulated_site(lora.cfg, 0, 3).train
    assert members and members <= set(zip(site0.texts, site0.targets, strict=True))
    assert not members & set(
        zip(
            simulated_site(lora.cfg, 1, 3).train.texts,
            simulated_site(lora.cfg, 1, 3).train.targets,
            strict=True,
        )
    )

    report = build_report(Path(lora.cfg.out_dir))

    # the membership scores are the drop of each canary's answer loss from round 1's adapter to the final
    mia = report["membership_inference"]
    assert mia["canaries"] == CANARIES and mia["members"] == len(members)
    assert 0.0 <= mia["attack_auc"] <= 1.0
    audit = Path(lora.cfg.out_dir) / "audit" / "server"
    losses = []
    for name in ("global-round-001.npz", "global-final.npz"):  # final last: the shared model ends as it was
        set_adapter_arrays(lora.shared.model, load_arrays(audit / name)[0])
        losses.append(
            example_losses(
                lora.shared.model,
                load_tokenizer(Path(lora.cfg.base_model)),
                canaries.records,
                batch_size=lora.cfg.batch_size,
                max_length=lora.cfg.max_length,
                device=select_device("cpu"),
            )
        )
    assert losses[0].shape == (CANARIES,) and (losses[1] > 0).all()
    assert np.allclose(mia["_scores"], losses[0] - losses[1], atol=1e-5)
