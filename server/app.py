"""The fedtune ServerApp (the coordinator)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedtune.common.config import parse_run_config
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from .federation import run_coordinator
from .progress import RunProgress


def make_server_app(overrides: Mapping[str, Any] | None = None, *, show_progress: bool = True) -> ServerApp:
    """A ServerApp whose run config is ``context.run_config`` fused with ``overrides``.

    ``flwr run`` fills ``context.run_config`` from ``[tool.flwr.app.config]``; ``fedtune simulate``
    runs in the installed environment and passes its resolved config as ``overrides``.
    """
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = parse_run_config({**context.run_config, **(overrides or {})})
        if show_progress:
            with RunProgress(cfg.num_server_rounds) as progress:
                run_coordinator(grid, context, cfg, progress)
        else:
            run_coordinator(grid, context, cfg)

    return server_app


app = make_server_app()
