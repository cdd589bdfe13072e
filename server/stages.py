"""The coordinator's round stages: small functions over one :class:`RunState`, run in order.

Like Flower's ``SecAggPlusWorkflow`` (a tuple of stage functions, each returning whether to go
on), :class:`fedtune.server.workflow.FedtuneWorkflow` runs around every round

- :data:`BEFORE_FIT`: draw the round's sites; send the base model to those that lack it; size
  SecAgg+ and DP to the sampled sites; stop before a round that would go past the privacy
  budget; keep the shared adapter the round starts from (audit);
- :data:`AFTER_FIT`: fail loudly when the round produced no aggregate (before scoring anything);
  when ``head-fit`` solves the head (``lda``, or ``auto`` for 3+ labels without DP), solve
  the shared head from the sites' statistics (:mod:`.head_fit`);
- :data:`AFTER_ROUND`: record the round; checkpoint it; then write ``metrics.json`` (so it never
  runs ahead of the checkpoint) and show the round.

A stage returns ``False`` to end the run after it (the remaining stages of the tuple are skipped).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from fedtune.common.audit import save_arrays
from fedtune.common.files import write_json_atomic
from fedtune.common.records import SCORES, SITE_SCORES, RoundRecord, write_records
from flwr.common import parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow.constant import MAIN_PARAMS_RECORD

from .head_fit import fit_head
from .outputs import privacy_record, resume_advice, write_round_checkpoint
from .run_state import RunState
from .sampling import RoundSampler

log = logging.getLogger(__name__)

Stage = Callable[[RunState, int, LegacyContext], bool]


def run_stages(stages: Sequence[Stage], state: RunState, server_round: int, context: LegacyContext) -> bool:
    """Run ``stages`` in order until one returns ``False``; return whether the run goes on."""
    return all(stage(state, server_round, context) for stage in stages)


def current_arrays(context: LegacyContext) -> list[Any]:
    """The shared adapter the workflow holds now, as numpy arrays in wire order."""
    current = compat.arrayrecord_to_parameters(context.state.array_records[MAIN_PARAMS_RECORD], True)
    return parameters_to_ndarrays(current)


# --- before fit ---------------------------------------------------------------------------------
def draw_round_sites(state: RunState, server_round: int, context: LegacyContext) -> bool:
    """Draw the sites this round trains (and evaluates) on, as the strategy would, ahead of the round.

    The strategy's own sampling then receives these sites (:class:`~fedtune.server.sampling.RoundSampler`).
    """
    sampler = context.client_manager
    if not isinstance(sampler, RoundSampler):
        raise TypeError(f"The coordinator needs a RoundSampler client manager, got {type(sampler).__name__}.")
    base = state.strategies.base
    drawn = sampler.draw(*base.num_fit_clients(sampler.num_available()))  # type: ignore[attr-defined]
    if state.cfg.fraction_evaluate > 0:
        drawn = drawn + sampler.draw(*base.num_evaluation_clients(sampler.num_available()))  # type: ignore[attr-defined]
    state.rounds.round_sites = sorted({proxy.node_id for proxy in drawn})
    return True


def distribute_base_model(state: RunState, server_round: int, context: LegacyContext) -> bool:
    """Check the round's sites not yet known to hold the base model; send it to those lacking it.

    Only the sites drawn for this round are checked (:func:`draw_round_sites`), so a site is checked
    before its first round, however many sites are connected. A site whose check or transfer failed
    is checked again before its next round; its training fails until then (a dropout). Writes
    ``base_model_distribution.json``.
    """
    if state.distributor is None:
        return True
    rounds = state.rounds
    new = sorted(set(rounds.round_sites) - rounds.model_ready)
    if not new:
        return True
    transfers = state.distributor.run(new)
    rounds.model_ready.update(t.node for t in transfers if t.status != "failed")
    rounds.distribution.extend({"before_round": server_round, **t.as_dict()} for t in transfers)
    write_json_atomic(state.folder.distribution, rounds.distribution)
    sent = [t for t in transfers if t.status == "received"]
    if sent and state.progress:
        state.progress.console.print(
            f"Base model sent to {len(sent)} site(s): {max(t.bytes_down for t in sent) / 1e6:.1f} MB "
            f"each in {max(t.seconds for t in sent):.1f} s; fingerprint verified by each site."
        )
    return True


def size_to_sampled_sites(state: RunState, server_round: int, context: LegacyContext) -> bool:
    """Size SecAgg+'s shares, central DP's n and distributed DP's per-site noise to this round's sample."""
    cfg = state.cfg
    available = context.client_manager.num_available()
    sampled, _ = state.strategies.base.num_fit_clients(available)  # type: ignore[attr-defined]
    state.rounds.sampling_rate = sampled / max(available, 1)
    if state.secagg is not None:
        state.secagg.num_shares = max(2, min(cfg.secagg_num_shares, sampled))
        state.secagg.reconstruction_threshold = max(
            2, min(cfg.secagg_reconstruction_threshold, state.secagg.num_shares)
        )
    if state.strategies.dp_wrapper is not None:
        state.strategies.dp_wrapper.num_sampled_clients = sampled
    if cfg.client_dp == "distributed":
        # each of the n sites adds N(0, sigma^2 C^2 / n): the sum carries N(0, sigma^2 C^2)
        state.rounds.dp_noise_std = cfg.dp_noise_multiplier * cfg.dp_clipping_norm / sampled**0.5
    return True


def stop_at_privacy_budget(state: RunState, server_round: int, context: LegacyContext) -> bool:
    """``False`` (the run stops, saying why) when this round would take epsilon past the target."""
    target = state.cfg.dp_target_epsilon
    if state.accountant is None or target <= 0:
        return True
    if not state.accountant.would_exceed(target, state.rounds.sampling_rate):
        return True
    state.rounds.stopped_early = (
        f"stopped before round {server_round}: it would take epsilon past `dp-target-epsilon` {target:g}"
    )
    log.warning(state.rounds.stopped_early)
    return False


def snapshot_global(state: RunState, server_round: int, context: LegacyContext) -> bool:
    """Audit: keep the shared adapter this round starts from (``audit/server/global-round-NNN.npz``)."""
    if state.cfg.audit:
        save_arrays(state.folder.global_round(server_round), current_arrays(context))
    return True


# --- after fit ----------------------------------------------------------------------------------
def require_aggregate(state: RunState, server_round: int, context: LegacyContext) -> bool:
    """Fail loudly when the round produced no aggregate; the checkpoint keeps the last good round.

    Raises
    ------
    RuntimeError
        Saying why the round failed and where the last good adapter is.
    """
    if any(r == server_round for r, _ in context.history.metrics_distributed_fit.get("train_loss", [])):
        return True
    outcome = state.strategies.guard.outcomes.get(server_round)
    if outcome is not None and outcome.failure:
        why = outcome.failure
    elif state.secagg is not None:
        failed = state.grid.failed_replies(server_round)
        why = (
            "SecAgg+ could not unmask the sum: too few sites replied at some stage for "
            f"`secagg-reconstruction-threshold` {state.secagg.reconstruction_threshold}"
            + (f" (failed: {failed})" if failed else "")
        )
    else:
        why = "no site update arrived"
    raise RuntimeError(f"Round {server_round} produced no aggregate: {why}. {resume_advice(state)}")


# --- after the round ----------------------------------------------------------------------------
def _latest(history_metrics: dict[str, list[tuple[int, Any]]], key: str, server_round: int) -> float | None:
    values = [v for r, v in history_metrics.get(key, []) if r == server_round]
    return float(values[-1]) if values else None


def record_round(state: RunState, server_round: int, context: LegacyContext) -> bool:
    """Append the round's :class:`RoundRecord` (scores, sites, bytes, seconds, epsilon)."""
    hist = context.history
    wire = state.grid.round_bytes(server_round)
    central, dist, fit = hist.metrics_centralized, hist.metrics_distributed, hist.metrics_distributed_fit
    outcome = state.strategies.guard.outcomes.pop(server_round, None)
    if state.accountant is not None:
        state.accountant.step(state.rounds.sampling_rate)
    now = time.perf_counter()
    state.rounds.records.append(
        RoundRecord(
            round=server_round,
            **{k: _latest(central, k, server_round) for k in SCORES},
            **{f"sites_{k}": _latest(dist, k, server_round) for k in SITE_SCORES},
            train_loss=_latest(fit, "train_loss", server_round),
            site_train_examples=state.rounds.site_examples,
            site_examples_per_second=_latest(fit, "examples_per_second", server_round),
            excluded_sites={str(k): v for k, v in sorted(outcome.excluded.items())} if outcome else {},
            bytes_up=sum(wire["up"].values()),
            bytes_down=sum(wire["down"].values()),
            bytes_up_per_site={str(k): v for k, v in sorted(wire["up"].items())},
            bytes_down_per_site={str(k): v for k, v in sorted(wire["down"].items())},
            seconds=now - state.rounds.round_start,
            dp_epsilon=state.accountant.epsilon() if state.accountant is not None else None,
            **_example_dp_fields(state.rounds.site_example_dp),
        )
    )
    state.rounds.site_example_dp = {}
    state.rounds.round_start = now
    return True


def _example_dp_fields(sites: dict[str, dict[str, float]]) -> dict[str, Any]:
    """The round record's patient-level DP fields (none when no site trained with DP-SGD)."""
    if not sites:
        return {}
    ordered = dict(sorted(sites.items(), key=lambda item: _site_order(item[0])))
    return {
        "example_dp_epsilon": max(s["epsilon"] for s in sites.values()),
        "sites_example_dp": ordered,
    }


def _site_order(label: str) -> tuple[int, str]:
    return (int(label), "") if label.isdigit() else (0, label)


def checkpoint_round(state: RunState, server_round: int, context: LegacyContext) -> bool:
    """Write everything a killed run needs to continue after ``server_round`` (atomically)."""
    write_round_checkpoint(state, server_round, current_arrays(context))
    return True


def write_round_outputs(state: RunState, server_round: int, context: LegacyContext) -> bool:
    """Rewrite ``privacy.json`` (under DP) and ``metrics.json`` after the checkpoint."""
    if state.cfg.dp_mode != "off":
        write_json_atomic(state.folder.privacy, privacy_record(state))
    write_records(state.folder.metrics, state.rounds.records)
    return True


def show_round(state: RunState, server_round: int, context: LegacyContext) -> bool:
    """Print the round's headline figures."""
    if state.progress:
        state.progress.round_done(state.rounds.records[-1])
    return True


BEFORE_FIT: tuple[Stage, ...] = (
    draw_round_sites,
    distribute_base_model,
    size_to_sampled_sites,
    stop_at_privacy_budget,
    snapshot_global,
)
AFTER_FIT: tuple[Stage, ...] = (require_aggregate, fit_head)
AFTER_ROUND: tuple[Stage, ...] = (record_round, checkpoint_round, write_round_outputs, show_round)
