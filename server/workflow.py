"""The round loop: Flower's legacy default workflow with hooks before and after every round.

Same stages as ``flwr.server.workflow.DefaultWorkflow`` (init, then per round: fit -
plain or SecAgg+ - centralized evaluation, federated evaluation), plus
``hooks.before_round`` (size SecAgg+/DP to the sampled sites, check the privacy budget;
``False`` stops the run), ``hooks.after_fit`` (raise when the round has no aggregate, before
evaluating anything) and ``hooks.round_end`` (record metrics, write the checkpoint). The loop
starts at ``hooks.start_round``: a resumed run starts after its checkpointed round, from the
strategy's initial parameters (the checkpointed adapter, scored when that round ended).
"""

from __future__ import annotations

import timeit
from typing import Protocol

from flwr.app import ConfigRecord, Context
from flwr.compat.common import recorddict_compat as compat
from flwr.compat.server.typing import Workflow
from flwr.server.compat.app_utils import start_update_client_manager_thread
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.server.workflow.default_workflows import (
    default_centralized_evaluation_workflow,
    default_evaluate_workflow,
    default_init_params_workflow,
)
from flwr.serverapp import Grid


class RoundHooks(Protocol):
    """What the workflow calls around each round, and the round it starts at."""

    start_round: int

    def before_round(self, server_round: int, context: LegacyContext) -> bool: ...  # noqa: D102

    def after_fit(self, server_round: int, context: LegacyContext) -> None: ...  # noqa: D102

    def round_end(self, server_round: int, context: LegacyContext) -> None: ...  # noqa: D102


class FedtuneWorkflow:
    """Run up to ``context.config.num_rounds`` rounds of ``fit_workflow`` with evaluation and hooks."""

    def __init__(self, fit_workflow: Workflow, hooks: RoundHooks) -> None:
        self.fit_workflow = fit_workflow
        self.hooks = hooks

    def __call__(self, grid: Grid, context: Context) -> None:
        """Execute the workflow."""
        if not isinstance(context, LegacyContext):
            raise TypeError(f"Expect a LegacyContext, but get {type(context).__name__}.")
        thread, f_stop, c_done = start_update_client_manager_thread(grid, context.client_manager)
        c_done.wait()
        try:
            start = self.hooks.start_round
            if start == 1:
                default_init_params_workflow(grid, context)
            else:
                parameters = context.strategy.initialize_parameters(client_manager=context.client_manager)
                context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
                    parameters, keep_input=True
                )
            cfg = ConfigRecord({Key.START_TIME: timeit.default_timer()})
            context.state.config_records[MAIN_CONFIGS_RECORD] = cfg
            for current_round in range(start, context.config.num_rounds + 1):
                cfg[Key.CURRENT_ROUND] = current_round
                if not self.hooks.before_round(current_round, context):
                    break
                self.fit_workflow(grid, context)
                self.hooks.after_fit(current_round, context)
                default_centralized_evaluation_workflow(grid, context)
                default_evaluate_workflow(grid, context)
                self.hooks.round_end(current_round, context)
        finally:
            f_stop.set()
            thread.join()
