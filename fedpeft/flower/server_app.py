"""Flower ServerApp: the adapter between Flower and the round loop (fedpeft.federation.loop). Flower hands
over a Grid, which becomes the federation's transport (fedpeft.flower.grid); `fedpeft simulate` hands in its
config, a SuperLink's run (`fedpeft server`, `flwr run`) Flower's run config, and its outcome goes to
RUN/status.json.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedpeft.atomic import atomic_write_json
from fedpeft.config.files import APP_KEYS, from_run_config
from fedpeft.config.tree import RunConfig
from fedpeft.errors import FedpeftError
from fedpeft.federation.loop import Federation
from fedpeft.federation.state import ServerState
from fedpeft.flower.grid import GridTransport
from fedpeft.log import setup_console

log = logging.getLogger("fedpeft")


@dataclass
class Outcome:
    """What the loop hands back to `fedpeft simulate` (Flower's runner swallows exceptions)."""

    state: ServerState | None = None
    error: str | None = None


def run_federation(grid: Grid, cfg: RunConfig, run_dir: Path, resume: int | None = None) -> ServerState:
    """The whole federation over Flower's `grid` (fedpeft.federation.loop.Federation.run), or its
    continuation from the checkpoint of round `resume`; returns the final state. Raises FedpeftError on
    unrecoverable input."""
    return Federation(GridTransport(grid, cfg.train.progress), cfg, run_dir).run(resume)


def make_server_app(cfg: RunConfig, run_dir: Path, resume: int | None, outcome: Outcome) -> ServerApp:
    """The ServerApp for `fedpeft simulate`: the config comes from our CLI, not Flower's run config."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            outcome.state = run_federation(grid, cfg, run_dir, resume)
        except FedpeftError as e:
            outcome.error = str(e)
        except Exception as e:  # reported by `fedpeft simulate`, which exits non-zero
            log.exception("the federation failed")
            outcome.error = f"the federation failed: {type(e).__name__}: {e}"

    return server_app


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point behind a SuperLink (`fedpeft server`, `flwr run`): the config is Flower's run config.
    The outcome goes to RUN/status.json, which `fedpeft server` waits for (Flower's run status does not
    carry our error message)."""
    setup_console()
    run_config = dict(context.run_config)
    app_keys = {key: run_config.pop(key, default) for key, default in APP_KEYS.items()}
    run_dir, resume = Path(str(app_keys["out"])), int(app_keys["resume-round"])  # -1: a new federation
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        state = run_federation(grid, from_run_config(run_config), run_dir, resume if resume >= 0 else None)
    except FedpeftError as e:
        log.error("%s", e)
        atomic_write_json(run_dir / "status.json", {"state": "failed", "error": str(e)})
        raise
    except Exception as e:
        log.exception("the federation failed")
        error = f"the federation failed: {type(e).__name__}: {e}"
        atomic_write_json(run_dir / "status.json", {"state": "failed", "error": error})
        raise
    atomic_write_json(run_dir / "status.json", {"state": "finished", "round": state.round})
