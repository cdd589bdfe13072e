"""The audit report a privacy officer reads: every section of report.md and its plots."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
from fedtune.common.audit_render import render_markdown, render_plots

TOTALS = {"messages": 4, "tensors": 8, "bytes": 1_000}
REPORT: dict[str, Any] = {
    "run": "out",
    "base_model_fingerprint": "b" * 64,
    "adapter_fingerprint": "a" * 64,
    "peft_method": "lora",
    "sites_recorded": 2,
    "only_adapter_left_sites": True,
    "offending_tensors": [],
    "site_and_server_records_agree": True,
    "integrity": {"consistent": True, "mismatches": []},
    "tensors_exchanged": {
        "totals": {"up": TOTALS, "down": TOTALS},
        "bytes_per_site_per_round": {"up": 250.0, "down": 250.0},
        "up_ratio_to_full_model": 0.004,
        "down_ratio_to_full_model": 0.004,
        "base_model_bytes": 90_000_000,
        "per_site": {"1234567": {"up": 500, "down": 500}, "7654321": {"up": 500, "down": 500}},
    },
    "secagg": {
        "secure_aggregation": True,
        "masked": True,
        "max_abs_correlation": 0.0123,
        "aggregate_max_abs_error": 9.8e-6,
        "aggregate_error_bound": 1.1e-5,
        "aggregate_within_bound": True,
        "aggregate_note": "",
        "per_site_round": [{"round": 1, "site": "site-0", "correlation": 0.0123}],
    },
    "dp": {"mode": "off", "accountant_epsilon": None, "delta": 1e-5},
}


def test_a_clean_run_reads_as_such_section_by_section() -> None:
    # Execute
    text = render_markdown(REPORT, ["bytes_per_site.png"])

    # Assert: each section, in order, with its figures
    sections = ["# fedtune privacy audit", "## What left the sites", "## Audit trail consistency"]
    sections += ["## Secure aggregation", "## Differential privacy", "## Plots"]
    assert [text.index(s) for s in sections] == sorted(text.index(s) for s in sections)
    assert "Only the adapter left the sites: yes." in text and "wire records: consistent." in text
    assert "| sites -> server | 4 | 8 | 1,000 | 250 | 0.0040 |" in text
    assert "**True** (max |correlation| 0.0123)" in text and "(bound 1.1e-05: within = True)" in text
    assert "| 1 | site-0 | 0.0123 |" in text and "![bytes_per_site.png](plots/bytes_per_site.png)" in text
    assert "## Membership inference" not in text


def test_problems_are_shown_loudly_with_what_and_where() -> None:
    # Prepare: a non-adapter tensor left a site, and the trail disagrees with itself
    report = copy.deepcopy(REPORT)
    report["only_adapter_left_sites"] = False
    report["offending_tensors"] = [
        {"node": 7, "round": 2, "stage": "fit", "name": "x", "shape": [3], "dtype": "float32"}
    ]
    report["integrity"] = {"consistent": False, "mismatches": ["m.json, record 2 (round 2): bytes_up 1"]}
    report["secagg"] |= {"aggregate_error_bound": None, "aggregate_note": "not comparable: dp-mode central"}

    # Execute
    text = render_markdown(report, [])

    # Assert
    assert "Only the adapter left the sites: **NO**." in text
    assert "| 7 | 2 | fit | x | [3] | float32 |" in text
    assert "**INCONSISTENT**" in text and "- m.json, record 2 (round 2): bytes_up 1" in text
    assert "(not comparable: dp-mode central)." in text


def test_membership_inference_adds_its_section_and_histogram(tmp_path: Path) -> None:
    # Prepare
    report = copy.deepcopy(REPORT)
    rng = np.random.default_rng(0)
    report["membership_inference"] = {
        "canaries": 20,
        "members": 10,
        "score": "loss drop",
        "attack_auc": 0.52,
        "tpr_at_1pct_fpr": 0.0,
        "_scores": rng.normal(size=20),
        "_members": np.arange(20) < 10,
    }
    report["empirical_epsilon"] = {
        "confidence": 0.95,
        "lower_bound": 0.0,
        "correct": 5,
        "guesses": 8,
        "accountant_epsilon": None,
    }

    # Execute
    written = render_plots(report, tmp_path)
    text = render_markdown(report, written)

    # Assert: three PNGs, and the section names the attack's figures
    assert written == ["bytes_per_site.png", "secagg_correlation.png", "mia_scores.png"]
    assert all((tmp_path / name).read_bytes()[:4] == b"\x89PNG" for name in written)
    assert "Attack AUC 0.5200; TPR at 1% FPR 0.0000." in text and "**0.000** (5/8 guesses correct)" in text
