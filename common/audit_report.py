"""``fedtune audit OUT``: measure, from the files a run left, what left each site and what it reveals.

Reads ``OUT/run_config.json``, ``OUT/adapter/fedtune.json``, the coordinator's records under
``OUT/audit/server`` and every site's under ``OUT/audit/sites/site-*`` (in a deployment the
operator gathers the sites' ``audit-dir`` folders there), and writes ``OUT/audit/report.json``,
``OUT/audit/report.md`` and plots. Sections:

- ``tensors_exchanged``: messages, tensors and bytes per direction and per site; bytes per site
  per round against the full base model.
- ``only_adapter_left_sites``: every uploaded tensor is, position by position, a tensor of the
  declared PEFT state (or its SecAgg+ masked form, or SecAgg+ key material); offenders listed.
- ``secagg``: per site and round, the correlation between what the coordinator received and the
  site's true update (about 0 when masked, about 1 in the clear), and the error of the unmasked
  aggregate against the plain weighted average of the sites' true updates.
- ``membership_inference`` / ``empirical_epsilon`` (with ``audit-canaries``): loss-based canary
  scores under the shared adapter, attack AUC, TPR at 1% FPR, and the one-run lower bound on
  epsilon beside the accountant's epsilon.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .audit import WireLog, load_arrays
from .audit_integrity import Numbered, integrity_check, record_problems
from .audit_render import CORRELATION_MASKED, render_markdown, render_plots
from .audit_stats import attack_auc, one_run_epsilon, tpr_at_fpr
from .canaries import CANARY_SITE, run_canaries
from .config import FedConfig, parse_run_config
from .files import write_text_atomic
from .records import RoundRecord, read_records
from .run_folder import (
    GLOBAL_FINAL,
    SENT_ROUND,
    WIRE_LOG,
    RunFolder,
    aggregate_round_name,
    global_round_name,
    received_round_name,
)

ADAPTER_RECORD = re.compile(r"^(fitres|fitins|evaluateins)\.parameters\.(\d+)$")
MASKED = re.compile(r"^secaggplus_configs\.masked_params\[(\d+)\]$")  # Flower's Key.MASKED_PARAMETERS


class AuditError(ValueError):
    """The run folder is not a complete fedtune run; the message names the file."""


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise AuditError(
            f"{path} is missing: not a finished fedtune run folder (run `fedtune simulate` first)."
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise AuditError(f"{path}: corrupt JSON ({err.msg}, line {err.lineno}).") from None


def _read_rounds(path: Path) -> list[RoundRecord]:
    """``metrics.json``'s round records; a missing or damaged file is an :class:`AuditError` naming it."""
    if not path.is_file():
        raise AuditError(
            f"{path} is missing: not a finished fedtune run folder (run `fedtune simulate` first)."
        )
    try:
        return read_records(path)
    except ValueError as err:
        raise AuditError(str(err)) from None


def _records(path: Path) -> list[Numbered]:
    """``(file, line, record)`` of every record in a ``wire.jsonl``."""
    if not path.is_file():
        raise AuditError(f"{path} is missing: the run was made with `audit=false` or the folder is partial.")
    try:
        return [(path, line, record) for line, record in WireLog(path).numbered()]
    except ValueError as err:
        raise AuditError(str(err)) from None


def _arrays(path: Path) -> tuple[list[np.ndarray], dict[str, float]]:
    try:
        return load_arrays(path)
    except (OSError, ValueError) as err:
        raise AuditError(f"{path}: unreadable audit arrays ({err}).") from None


# --- tensors exchanged -----------------------------------------------------------------------------
def tensors_exchanged(server: list[dict], base_model_bytes: int) -> dict[str, Any]:
    """Totals per direction and per site, and bytes per site per round vs the full base model."""
    totals = {d: {"messages": 0, "tensors": 0, "bytes": 0} for d in ("down", "up")}
    per_site: dict[str, dict[str, int]] = defaultdict(lambda: {"down": 0, "up": 0})
    per_round_site: dict[tuple[int, int], dict[str, int]] = defaultdict(lambda: {"down": 0, "up": 0})
    for r in server:
        d = r["direction"]
        totals[d]["messages"] += 1
        totals[d]["tensors"] += len(r["tensors"])
        totals[d]["bytes"] += r["payload_bytes"]
        per_site[str(r["node"])][d] += r["payload_bytes"]
        if r["round"] > 0:
            per_round_site[(r["round"], r["node"])][d] += r["payload_bytes"]
    cells = list(per_round_site.values())
    up = float(np.mean([c["up"] for c in cells])) if cells else 0.0
    down = float(np.mean([c["down"] for c in cells])) if cells else 0.0
    return {
        "totals": totals,
        "per_site": dict(per_site),
        "bytes_per_site_per_round": {"up": up, "down": down},
        "base_model_bytes": base_model_bytes,
        "up_ratio_to_full_model": up / base_model_bytes,
        "down_ratio_to_full_model": down / base_model_bytes,
    }


# --- only the adapter left ---------------------------------------------------------------------------
def offending_uploads(
    records: list[dict], adapter_shapes: list[list[int]], declared: Sequence[list[list[int]]] = ()
) -> list[dict[str, Any]]:
    """Uploaded tensors that are not the declared adapter (plain or masked) nor SecAgg+ key material.

    ``declared``: the shapes of each other upload a site may send whole (``head-fit``'s statistics,
    and under SecAgg+ its feature moments).
    """
    bad = []
    for r in records:
        if r["direction"] != "up":
            continue
        params = []
        for t in r["tensors"]:
            plain, masked = ADAPTER_RECORD.match(t["name"]), MASKED.match(t["name"])
            if plain and plain.group(1) == "fitres":
                params.append((int(plain.group(2)), t))
            elif masked and int(masked.group(1)) == 0 and t["shape"] == [1]:
                continue  # SecAgg+ weight factor
            elif masked:
                params.append((int(masked.group(1)) - 1, t))
            elif t["dtype"] == "bytes" and r["stage"] in ("setup", "share_keys", "unmask", ""):
                continue  # SecAgg+ public keys, encrypted key shares, unmask shares (not tensors)
            else:
                bad.append({**_where(r), "name": t["name"], "shape": t["shape"], "dtype": t["dtype"]})
        if [t["shape"] for _, t in sorted(params, key=lambda p: p[0])] in declared:
            continue  # head-fit's feature statistics or moments, declared in fedtune.json
        for index, t in params:
            if index >= len(adapter_shapes) or t["shape"] != adapter_shapes[index]:
                bad.append({**_where(r), "name": t["name"], "shape": t["shape"], "dtype": t["dtype"]})
        if params and len(params) != len(adapter_shapes):
            bad.append({**_where(r), "name": f"{len(params)} parameter tensors", "shape": [], "dtype": ""})
    return bad


def _where(r: dict) -> dict[str, Any]:
    return {"node": r["node"], "round": r["round"], "stage": r["stage"]}


# --- SecAgg check ------------------------------------------------------------------------------------------
def _flat(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([a.astype(np.float64).ravel() for a in arrays]) if arrays else np.zeros(0)


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    if a.size != b.size or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def secagg_check(audit_dir: Path, cfg: FedConfig, max_weight: float) -> dict[str, Any]:
    """Correlation of received vs true updates per site and round; aggregate error per round."""
    run = RunFolder(audit_dir.parent)
    server_dir = run.audit_server
    sites: dict[tuple[int, int], dict[str, Any]] = {}  # (round, node) -> the site's own record
    for sent_file in sorted(run.audit_sites.glob(f"site-*/{SENT_ROUND}*.npz")):
        server_round = int(sent_file.stem.rsplit("-", 1)[1])
        sent, scalars = _arrays(sent_file)
        glob_site, _ = _arrays(sent_file.with_name(global_round_name(server_round)))
        sites[(server_round, int(scalars["node"]))] = {
            "site": sent_file.parent.name,
            "sent": sent,
            "global": glob_site,
            "weight": scalars["num_examples"],
        }
    if not sites:
        raise AuditError(
            f"{run.audit_sites} holds no site records (sent-round-*.npz): gather the sites' folders."
        )
    rows, errors = [], []
    rounds = sorted({r for r, _ in sites})
    server_step = ServerStep(cfg)
    for server_round in rounds:
        glob, _ = _arrays(run.global_round(server_round))
        contributions = []
        for (r, node), site in sorted(sites.items()):
            if r != server_round:
                continue
            received_file = server_dir / received_round_name(server_round, node)
            received, _ = _arrays(received_file)
            true_update = _flat(site["sent"]) - _flat(glob)
            seen = _flat(received[1:]) if cfg.secure_aggregation else _flat(received) - _flat(glob)
            rows.append(
                {
                    "round": server_round,
                    "site": site["site"],
                    "node": node,
                    "correlation": _correlation(seen, true_update),
                    "site_saw_coordinators_global": bool(np.array_equal(_flat(site["global"]), _flat(glob))),
                }
            )
            contributions.append((site["weight"], true_update))
        errors.append(_aggregate_error(server_dir, server_round, glob, contributions, server_step))
    corr = np.array([r["correlation"] for r in rows])
    # the coordinator's step is recomputed from every round since the first (FedAvgM's momentum)
    applicable = (
        server_step.known and cfg.client_dp != "central" and rounds == list(range(1, len(rounds) + 1))
    )
    step = 2 * cfg.secagg_clipping_range / (cfg.secagg_quantization_range - 1)
    bound = server_step.error_gain * (
        len({r["node"] for r in rows})
        * step
        * max_weight
        / min(sum(w for w, _ in e["contrib"]) for e in errors)
        if cfg.secure_aggregation
        else 1e-5
    )
    max_error = max(e["max_abs_error"] for e in errors)
    return {
        "secure_aggregation": cfg.secure_aggregation,
        "masked": bool(np.all(np.abs(corr) < CORRELATION_MASKED)),
        "max_abs_correlation": float(np.nanmax(np.abs(corr))),
        "per_site_round": rows,
        "aggregate_max_abs_error": max_error,
        "aggregate_error_bound": bound if applicable else None,
        "aggregate_within_bound": (max_error <= bound) if applicable else None,
        "aggregate_note": ""
        if applicable
        else f"not comparable: strategy {cfg.strategy}, dp-mode {cfg.dp_mode}",
        "per_round_error": [{k: v for k, v in e.items() if k != "contrib"} for e in errors],
    }


class ServerStep:
    """The coordinator's step from the weighted average of the sites' updates to the next shared adapter.

    FedAvg and FedProx take the average; FedAvgM (Flower's, as in ``torch.optim.SGD``) takes
    ``new = old - lr * m`` with ``m = momentum * m_prev + (old - average)`` (``m`` = the first
    pseudo-gradient in round 1). ``error_gain`` bounds how much of one round's quantisation error
    reaches the adapter (FedAvgM: ``lr / (1 - momentum)``, the sum of the momentum's geometric series).
    FedAdam and FedYogi are not recomputed (``known`` is false).
    """

    def __init__(self, cfg: FedConfig) -> None:
        self.strategy, self.lr, self.momentum = cfg.strategy, cfg.fedavgm_lr, cfg.fedavgm_momentum
        self.known = self.strategy in ("fedavg", "fedprox", "fedavgm")
        self.error_gain = self.lr / (1.0 - self.momentum) if self.strategy == "fedavgm" else 1.0
        self._velocity: np.ndarray | None = None

    def __call__(self, old: np.ndarray, average: np.ndarray) -> np.ndarray:
        """The next shared adapter (flat) from the current one and the sites' weighted average."""
        if self.strategy != "fedavgm":
            return average
        pseudo_gradient = old - average
        first = self._velocity is None or self.momentum == 0.0
        self._velocity = pseudo_gradient if first else self.momentum * self._velocity + pseudo_gradient
        return old - self.lr * self._velocity


def _aggregate_error(
    server_dir: Path, server_round: int, glob: list[np.ndarray], contrib: list, server_step: ServerStep
) -> dict[str, Any]:
    averaged = server_dir / aggregate_round_name(server_round)  # head-fit: before its head was replaced
    later = server_dir / global_round_name(server_round + 1)
    new_file = averaged if averaged.is_file() else later if later.is_file() else server_dir / GLOBAL_FINAL
    new, _ = _arrays(new_file)
    total = sum(w for w, _ in contrib)
    expected = server_step(_flat(glob), _flat(glob) + sum(w * u for w, u in contrib) / total)
    return {
        "round": server_round,
        "max_abs_error": float(np.abs(_flat(new) - expected).max()),
        "sites": len(contrib),
        "contrib": contrib,
    }


# --- membership inference ------------------------------------------------------------------------------
def membership(out_dir: Path, cfg: FedConfig, meta: dict[str, Any]) -> dict[str, Any]:
    """Loss-based canary scores: loss under the initial adapter minus loss under the shared adapter."""
    from .adapters import set_adapter_arrays
    from .model import bring_up
    from .train import example_losses

    canaries = run_canaries(cfg, tuple(meta["label_names"]))
    # the audit runs where the report is made: any device there, whatever the run used
    parts = bring_up(dataclasses.replace(cfg, device="auto"), len(meta["label_names"]))
    model, tokenizer, device = parts.model, parts.tokenizer, parts.device
    losses = []
    run = RunFolder(out_dir)
    for path in (run.global_round(1), run.global_final):
        arrays, _ = _arrays(path)
        set_adapter_arrays(model, arrays)
        losses.append(
            example_losses(
                model,
                tokenizer,
                canaries.records,
                batch_size=cfg.batch_size,
                max_length=cfg.max_length,
                device=device,
            )
        )
    scores = losses[0] - losses[1]
    one_run = one_run_epsilon(scores, canaries.members, delta=cfg.dp_delta)
    return {
        "canaries": int(cfg.audit_canaries),
        "members": int(canaries.members.sum()),
        "attack_auc": attack_auc(scores, canaries.members),
        "tpr_at_1pct_fpr": tpr_at_fpr(scores, canaries.members, 0.01),
        "score": "loss under the initial adapter minus loss under the shared adapter",
        "empirical_epsilon": {
            "lower_bound": one_run.epsilon_lower_bound,
            "confidence": one_run.confidence,
            "delta": one_run.delta,
            "guesses": one_run.guesses,
            "correct": one_run.correct,
        },
        "_scores": scores,
        "_members": canaries.members,
    }


# --- the report ---------------------------------------------------------------------------------------------
def build_report(out_dir: Path) -> dict[str, Any]:
    """Compute every section of the audit for the run in ``out_dir``."""
    run = RunFolder(Path(out_dir))
    cfg = parse_run_config(_read_json(run.run_config))
    meta = _read_json(run.adapter_metadata)
    audit_dir = run.audit
    rounds = _read_rounds(run.metrics)
    server_lines = _records(run.audit_server / WIRE_LOG)
    site_logs = sorted(run.audit_sites.glob(f"site-*/{WIRE_LOG}"))
    site_lines = [item for p in site_logs for item in _records(p)]
    mismatches = integrity_check(run.metrics, rounds, server_lines, site_lines)
    server = [r for f, n, r in server_lines if not record_problems(f, n, r)]  # well-formed records only
    site_records = [r for f, n, r in site_lines if not record_problems(f, n, r)]
    head_uploads = [meta[k] for k in ("head_statistics_shapes", "head_moments_shapes") if meta.get(k)]
    offending = offending_uploads(server + site_records, meta["adapter_shapes"], head_uploads)
    report: dict[str, Any] = {
        "run": str(out_dir),
        "base_model_fingerprint": meta["base_model_fingerprint"],
        "adapter_fingerprint": meta["adapter_fingerprint"],
        "peft_method": meta["peft_method"],
        "sites_recorded": len(site_logs),
        "tensors_exchanged": tensors_exchanged(server, meta["base_model_bytes"]),
        "only_adapter_left_sites": not offending,
        "head_statistics_shapes": meta.get("head_statistics_shapes"),
        "head_moments_shapes": meta.get("head_moments_shapes"),
        "offending_tensors": offending,
        # every record well formed and each site's record equal to the coordinator's
        "site_and_server_records_agree": not any(m.node for m in mismatches) if site_logs else None,
        "integrity": {"consistent": not mismatches, "mismatches": [str(m) for m in mismatches]},
        "secagg": secagg_check(audit_dir, cfg, meta["secagg_max_weight"]),
    }
    privacy = _read_json(run.privacy) if run.privacy.is_file() else {}
    accountant_eps = privacy.get("epsilon")  # client-level
    site_eps = {k: v["epsilon"] for k, v in privacy.get("example_dp", {}).get("sites", {}).items()}
    report["dp"] = {
        "mode": cfg.dp_mode,
        "accountant_epsilon": accountant_eps,
        "example_epsilon_by_site": site_eps,  # patient-level, each site's DP-SGD accountant
        "delta": cfg.dp_delta,
    }
    if cfg.audit_canaries:
        report["membership_inference"] = membership(run.root, cfg, meta)
        report["empirical_epsilon"] = {
            **report["membership_inference"]["empirical_epsilon"],
            "accountant_epsilon": accountant_eps,
            # the canaries are records of site 0: its patient-level epsilon bounds the attack
            "canary_site_example_epsilon": site_eps.get(str(CANARY_SITE)),
        }
    return report


def write_report(out_dir: Path) -> dict[str, Any]:
    """Build the audit of ``out_dir`` and write ``audit/report.json``, ``audit/report.md`` and plots."""
    report = build_report(Path(out_dir))
    run = RunFolder(Path(out_dir))
    plots = render_plots(report, run.audit_plots)
    public = {k: v for k, v in report.items()}
    if "membership_inference" in public:
        public["membership_inference"] = {
            k: v for k, v in public["membership_inference"].items() if k[0] != "_"
        }
    write_text_atomic(run.audit_report, json.dumps(public, indent=2, default=float) + "\n")
    write_text_atomic(run.audit_report_md, render_markdown(report, plots))
    return public
