"""The round loop: Flower's legacy default workflow with a hook after every round.

Same stages as ``flwr.server.workflow.DefaultWorkflow`` (init, then per round: fit -
plain or SecAgg+ - centralized evaluation, federated evaluation), plus
``on_round_end(round, context)`` where the coordinator records metrics and writes its
checkpoint. SecAgg+ share counts are clamped to the sites sampled in the round.
"""

from __future__ import annotations

import timeit
from collections.abc import Callable

from flwr.app import ConfigRecord, Context
from flwr.compat.server.typing import Workflow
from flwr.server.compat.app_utils import start_update_client_manager_thread
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, Key
from flwr.server.workflow.default_workflows import (
    default_centralized_evaluation_workflow,
    default_evaluate_workflow,
    default_init_params_workflow,
)
from flwr.serverapp import Grid

RoundHook = Callable[[int, LegacyContext], None]


class FedtuneWorkflow:
    """Run ``context.config.num_rounds`` rounds of ``fit_workflow`` with evaluation and a round hook."""

    def __init__(
        self, fit_workflow: Workflow, on_round_end: RoundHook, secagg_shares: tuple[int, int] | None
    ) -> None:
        self.fit_workflow = fit_workflow
        self.on_round_end = on_round_end
        self.secagg_shares = secagg_shares  # configured (num_shares, threshold) when fit is SecAgg+

    def _clamp_shares(self, context: LegacyContext) -> None:
        if not isinstance(self.fit_workflow, SecAggPlusWorkflow) or self.secagg_shares is None:
            return
        sampled, _ = context.strategy.num_fit_clients(context.client_manager.num_available())  # type: ignore[attr-defined]
        shares, threshold = self.secagg_shares
        self.fit_workflow.num_shares = max(2, min(shares, sampled))
        self.fit_workflow.reconstruction_threshold = max(2, min(threshold, self.fit_workflow.num_shares))

    def __call__(self, grid: Grid, context: Context) -> None:
        """Execute the workflow."""
        if not isinstance(context, LegacyContext):
            raise TypeError(f"Expect a LegacyContext, but get {type(context).__name__}.")
        thread, f_stop, c_done = start_update_client_manager_thread(grid, context.client_manager)
        c_done.wait()
        try:
            default_init_params_workflow(grid, context)
            cfg = ConfigRecord({Key.START_TIME: timeit.default_timer()})
            context.state.config_records[MAIN_CONFIGS_RECORD] = cfg
            for current_round in range(1, context.config.num_rounds + 1):
                cfg[Key.CURRENT_ROUND] = current_round
                self._clamp_shares(context)
                self.fit_workflow(grid, context)
                default_centralized_evaluation_workflow(grid, context)
                default_evaluate_workflow(grid, context)
                self.on_round_end(current_round, context)
        finally:
            f_stop.set()
            thread.join()
