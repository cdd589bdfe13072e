"""The round loop: Flower's legacy default workflow with the coordinator's stages around every round.

Same steps as ``flwr.server.workflow.DefaultWorkflow`` (init, then per round: fit - plain or
SecAgg+ - centralized evaluation, federated evaluation), plus the stage tuples of
:class:`Stages` (:mod:`fedtune.server.stages`): ``before_fit`` (a ``False`` ends the run before
the round), ``after_fit`` (before evaluating anything) and ``after_round``. The loop starts at
the run state's ``rounds.start_round``: a resumed run starts after its checkpointed round, from
the strategy's initial parameters (the checkpointed adapter, scored when that round ended).
"""

from __future__ import annotations

import timeit
from collections.abc import Sequence
from dataclasses import dataclass

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

from .run_state import RunState
from .stages import Stage, run_stages


@dataclass(frozen=True)
class Stages:
    """The stage tuples run before fit, after fit and after each round."""

    before_fit: Sequence[Stage]
    after_fit: Sequence[Stage]
    after_round: Sequence[Stage]


class FedtuneWorkflow:
    """Run up to ``context.config.num_rounds`` rounds of ``fit_workflow`` with evaluation and stages."""

    def __init__(self, fit_workflow: Workflow, stages: Stages, state: RunState) -> None:
        self.fit_workflow = fit_workflow
        self.stages = stages
        self.state = state

    def __call__(self, grid: Grid, context: Context) -> None:
        """Execute the workflow."""
        if not isinstance(context, LegacyContext):
            raise TypeError(f"Expect a LegacyContext, but get {type(context).__name__}.")
        thread, f_stop, c_done = start_update_client_manager_thread(grid, context.client_manager)
        c_done.wait()
        try:
            start, state = self.state.rounds.start_round, self.state
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
                if not run_stages(self.stages.before_fit, state, current_round, context):
                    break
                self.fit_workflow(grid, context)
                go_on = run_stages(self.stages.after_fit, state, current_round, context)
                default_centralized_evaluation_workflow(grid, context)
                default_evaluate_workflow(grid, context)
                if not (run_stages(self.stages.after_round, state, current_round, context) and go_on):
                    break
        finally:
            f_stop.set()
            thread.join()
