"""ServerApp: read the run config and hand the Grid to fedpeft's server loop."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedpeft.imports import gc_paused

with gc_paused():  # Flower starts a ServerApp process per run: the model stack's import, ~15 % cheaper
    from fedpeft.runtime import quiet_libraries
    from fedpeft.server import run_server

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    quiet_libraries()
    run_server(grid, dict(context.run_config))
