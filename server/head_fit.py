"""After every round the shared head is solved from the sites' aggregated statistics (``head-fit``).

``head-fit=lda`` does so always, ``auto`` (the default) for a classification task of 3 or more labels
without DP.

After a round's aggregate, the coordinator asks the sites in it for the statistics of their
training examples under the new shared adapter (:func:`fedtune.common.head_fit.site_statistics`),
through the run's own fit workflow, so under ``secure-aggregation`` the statistics are masked by
SecAgg+ exactly like an update and the coordinator learns only their example-weighted mean. That
mean is the pooled data's, so the LDA head solved from it (:func:`fedtune.common.head_fit.solve_lda`)
is the one the pooled training splits would give. It replaces the averaged head in the shared
adapter before the round is scored, checkpointed and sent out again.

Under SecAgg+ the statistics are preceded by an exchange of each feature's mean and mean square
(:func:`pooled_statistics`). SecAgg+ quantises every value with one step over its clipping range,
far too coarse for the covariance of a trained encoder's features about their mean: the moments fix
where the features lie and how far they spread, and the statistics then travel centred and scaled in
that frame (:class:`~fedtune.common.head_fit.StatisticsFrame`), which the coordinator maps back
exactly. The sites learn the frame: the pooled mean and variance of each feature under the shared
adapter.

The exchange runs with a strategy of its own (:class:`StatisticsStrategy`: a plain weighted mean, no
server optimiser, no update guard), and the shared adapter the workflow holds is restored around it.
With ``audit=true`` the coordinator keeps the round's averaged adapter before its head was replaced
(``aggregate-round-NNN.npz``, which the audit checks the aggregation against) and the statistics it
learned (``head-stats-round-NNN.npz``); what each site sent is filed apart from its updates
(:meth:`~fedtune.server.wire.MeteredGrid.labelled`: ``received-head-stats-...`` and, under SecAgg+,
``received-head-moments-...``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

import numpy as np
from fedtune.common import instructions
from fedtune.common.adapters import adapter_names
from fedtune.common.audit import save_arrays
from fedtune.common.config import FedConfig
from fedtune.common.head_fit import FeatureMoments, HeadStatistics, StatisticsFrame, solve_lda
from fedtune.common.model import head_layer
from fedtune.common.run_folder import (
    HEAD_MOMENTS_LABEL,
    HEAD_STATS_LABEL,
    aggregate_round_name,
    head_stats_round_name,
)
from flwr.common import FitIns, FitRes, Parameters, Scalar, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.strategy.aggregate import aggregate
from flwr.server.workflow.constant import MAIN_PARAMS_RECORD
from flwr.server.workflow.default_workflows import default_fit_workflow
from peft import PeftModel
from peft.utils import ModulesToSaveWrapper

from .run_state import RunState

log = logging.getLogger(__name__)
Pooled = TypeVar("Pooled", HeadStatistics, FeatureMoments)

SPREAD_SHARE = 1 / 4  # of SecAgg+'s clipping range: a frame's pooled mean square of a feature, weighted
FLOOR_STEPS = 4  # SecAgg+ quantisation steps: the smallest variance the quantised moments tell from 0


class StatisticsStrategy(Strategy, Generic[Pooled]):
    """Asks ``sites`` for their head statistics (or feature moments) and keeps their example-weighted mean.

    ``parse`` reads the mean (``(arrays, examples)``): :meth:`HeadStatistics.from_arrays` or
    :meth:`FeatureMoments.from_arrays`.
    """

    def __init__(
        self,
        sites: list[ClientProxy],
        config: dict[str, Scalar],
        parse: Callable[[Sequence[np.ndarray], int], Pooled],
    ) -> None:
        self.sites = sites
        self.config = config
        self.parse: Callable[[Sequence[np.ndarray], int], Pooled] = parse
        self.pooled: Pooled | None = None

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:  # noqa: D102
        return None

    def configure_fit(  # noqa: D102
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        return [(proxy, FitIns(parameters, dict(self.config))) for proxy in self.sites]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """The example-weighted mean (under SecAgg+ every result already holds it)."""
        if not results:
            return None, {}
        weighted = [(parameters_to_ndarrays(res.parameters), res.num_examples) for _, res in results]
        mean = aggregate(weighted)
        try:
            self.pooled = self.parse(mean, sum(n for _, n in weighted))
        except ValueError as err:
            log.error("Round %d: the sites' head statistics are unusable: %s", server_round, err)
            return None, {}
        return ndarrays_to_parameters(mean), {}

    def configure_evaluate(self, server_round, parameters, client_manager):  # noqa: ANN001, ANN201, D102
        return []

    def aggregate_evaluate(self, server_round, results, failures):  # noqa: ANN001, ANN201, D102
        return None, {}

    def evaluate(self, server_round, parameters):  # noqa: ANN001, ANN201, D102
        return None


def head_indices(model: PeftModel) -> tuple[int, int]:
    """Where the classifier head's weight and bias are among the exchanged tensors (wire order).

    Raises
    ------
    ValueError
        When the exchanged tensors hold no head (not a sequence classifier).
    """
    head, names = head_layer(model), adapter_names(model)
    owners = [
        n for n, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper) and head in m.modules()
    ]
    found = [
        i
        for kind in ("weight", "bias")
        for i, name in enumerate(names)
        if owners
        and name in {f"{owners[0]}.{kind}", f"{owners[0]}.modules_to_save.{model.active_adapter}.{kind}"}
    ]
    if len(found) != 2:
        raise ValueError(
            f"head_indices: the exchanged tensors {names} hold no classifier head weight and bias."
        )
    return found[0], found[1]


def _exchange(
    state: RunState,
    context: LegacyContext,
    sites: list[ClientProxy],
    config: dict[str, Scalar],
    parse: Callable[[Sequence[np.ndarray], int], Pooled],
    label: str = HEAD_STATS_LABEL,
) -> Pooled | None:
    """One exchange through the run's fit workflow: the mean of what the sites sent, else ``None``.

    The sites compute it under the shared adapter the workflow holds, which is kept: the workflow
    writes the mean in its place, and it is put back.
    """
    collector, strategy = StatisticsStrategy(sites, config, parse), context.strategy
    adapter = context.state.array_records[MAIN_PARAMS_RECORD]
    context.strategy = collector
    try:
        with state.grid.labelled(label):
            (state.secagg or default_fit_workflow)(state.grid, context)
    finally:
        context.strategy = strategy
        context.state.array_records[MAIN_PARAMS_RECORD] = adapter
    return collector.pooled


def secagg_frame(cfg: FedConfig, max_weight: float, moments: FeatureMoments) -> StatisticsFrame:
    """The frame the statistics travel in under SecAgg+, from the sites' pooled feature ``moments``.

    SecAgg+ sums ``n_i / max_weight`` times each site's values, so a site's weighted mean square of a
    feature is at most the pooled one (a sum of non-negative terms), and every other value is bounded
    by it too (Cauchy-Schwarz). The frame makes that pooled sum :data:`SPREAD_SHARE` of the clipping
    range, so no site's value is clipped. A variance the quantised moments cannot resolve (below
    :data:`FLOOR_STEPS` quantisation steps) counts as that floor.
    """
    load = moments.examples / max_weight  # what SecAgg+ weighs the sites with in all
    step = 2 * cfg.secagg_clipping_range / cfg.secagg_quantization_range / load  # in the pooled mean
    spread = SPREAD_SHARE * cfg.secagg_clipping_range / load
    return StatisticsFrame.of(moments, spread=spread, floor=FLOOR_STEPS * step)


def pooled_statistics(
    state: RunState,
    server_round: int,
    context: LegacyContext,
    sites: list[ClientProxy],
    config: dict[str, Scalar],
) -> HeadStatistics | None:
    """The sites' pooled head statistics, ``None`` when none arrive.

    Without SecAgg+ the sites send their statistics as they are. Under SecAgg+, whose quantisation
    is far too coarse for them as they are, the sites first send their features' moments, and then
    their statistics centred and scaled in the frame those give (:func:`secagg_frame`), from which
    the coordinator maps them back exactly. With ``audit=true`` the coordinator keeps the moments it
    learned (``head-moments-round-NNN.npz``).
    """
    if state.secagg is None:
        return _exchange(state, context, sites, config, HeadStatistics.from_arrays)
    moments_config = {**config, instructions.HEAD_MOMENTS: True}
    moments = _exchange(state, context, sites, moments_config, FeatureMoments.from_arrays, HEAD_MOMENTS_LABEL)
    if moments is None:
        return None
    if state.cfg.audit:
        name = head_stats_round_name(server_round, HEAD_MOMENTS_LABEL)
        save_arrays(state.folder.audit_server / name, moments.arrays(np.float64), examples=moments.examples)
    frame = secagg_frame(state.cfg, state.max_weight, moments)
    framed_config = {**config, instructions.HEAD_FRAME: frame.to_bytes()}
    framed = _exchange(state, context, sites, framed_config, HeadStatistics.from_arrays)
    return frame.undo(framed) if framed is not None else None


def fit_head(state: RunState, server_round: int, context: LegacyContext) -> bool:
    """Replace the round's averaged head by the LDA head of the sites' statistics (``head-fit``).

    The sites asked are those whose updates are in the round's aggregate (a site that dropped out of
    the round is not waited for again). Sites that fail to answer are left out of the mean (under
    SecAgg+ as its threshold allows); when no statistics arrive, the round keeps its averaged head
    and a warning says so.
    """
    cfg = state.cfg
    if not state.solves_head:
        return True
    record = context.state.array_records[MAIN_PARAMS_RECORD]
    arrays = parameters_to_ndarrays(compat.arrayrecord_to_parameters(record, True))
    outcome = state.strategies.guard.outcomes.get(server_round)
    aggregated = outcome.sampled - set(outcome.excluded) if outcome else set(state.rounds.round_sites)
    sites = [p for p in context.client_manager.all().values() if p.node_id in aggregated]
    config = {**state.strategies.base.on_fit_config_fn(server_round), instructions.HEAD_STATS: True}  # type: ignore[attr-defined]
    pooled = pooled_statistics(state, server_round, context, sites, config)
    if pooled is None:
        log.warning(
            "Round %d: no head statistics arrived; the shared head stays the sites' average.", server_round
        )
        return True
    # within half SecAgg+'s clipping range, so the head a site trains from it fits SecAgg+ (the same
    # head whether SecAgg+ is on or off)
    weight, bias = solve_lda(pooled, cfg.head_fit_shrinkage, cfg.secagg_clipping_range / 2)
    if cfg.audit:
        save_arrays(state.folder.audit_server / aggregate_round_name(server_round), arrays)
        save_arrays(
            state.folder.audit_server / head_stats_round_name(server_round),
            pooled.arrays(np.float64),  # as solved
        )
    w, b = head_indices(state.shared.model)
    arrays[w], arrays[b] = weight.astype(arrays[w].dtype), bias.astype(arrays[b].dtype)
    context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
        ndarrays_to_parameters([np.asarray(a) for a in arrays]), True
    )
    return True
