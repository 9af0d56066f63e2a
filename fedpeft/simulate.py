"""`fedpeft simulate`: a federation of virtual clients on Flower's simulation engine (Ray), loopback only."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from fedpeft.checkpoint import atomic_write_json
from fedpeft.config import RunConfig, to_run_config
from fedpeft.errors import FedpeftError
from fedpeft.federation import ServerState, check_resume_config, latest_checkpoint, resume_round

log = logging.getLogger("fedpeft")


def _check_data(cfg: RunConfig) -> None:
    """Fail before Ray starts if the data cannot form the clients (needs the tokenizer only)."""
    from transformers import AutoTokenizer

    from fedpeft.base import resolve_base_dir
    from fedpeft.partition import partition

    tokenizer = AutoTokenizer.from_pretrained(resolve_base_dir(cfg.base.model, cfg.base.cache_dir))
    f = cfg.federation
    clients = partition(cfg.data, tokenizer, f.clients, f.split, f.dirichlet_alpha, f.seed)
    log.info(
        "%d clients (%s split), %d-%d training tokens each",
        len(clients),
        f.split,
        min(c.train_tokens for c in clients),
        max(c.train_tokens for c in clients),
    )


def with_store(cfg: RunConfig, run_dir: Path) -> RunConfig:
    """Personalization without --store keeps one personal store per virtual client in RUN/personal."""
    from dataclasses import replace

    from fedpeft.personalize import check_method

    check_method(cfg)
    if cfg.personal.method == "none" or cfg.personal.store:
        return cfg
    return replace(cfg, personal=replace(cfg.personal, store=str(Path(run_dir).resolve() / "personal")))


def ray_temp_dir(run_dir: Path) -> Path:
    """Ray's temp folder under the run folder. Ray puts Unix sockets at
    <temp>/session_<date>_<time>_<usec>_<pid>/sockets/plasma_store (62 more bytes) and refuses paths over
    107 bytes, so a run folder deeper than 40 bytes gets a short temp folder instead (removed afterwards)."""
    candidate = run_dir.resolve() / "ray"
    if len(str(candidate)) <= 40:
        candidate.mkdir(parents=True, exist_ok=True)
        return candidate
    return Path(tempfile.mkdtemp(prefix="fedpeft-ray-"))


def quiet_environment() -> None:
    """Read at import time by Flower, transformers and Python in Ray's worker processes, which inherit it."""
    for key, value in (
        ("FLWR_TELEMETRY_ENABLED", "0"),
        ("FLWR_DISABLE_UPDATE_CHECK", "1"),
        ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
        ("TRANSFORMERS_VERBOSITY", "error"),
        ("PYTHONWARNINGS", "ignore"),
        ("TOKENIZERS_PARALLELISM", "false"),
        ("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0"),
    ):
        os.environ.setdefault(key, value)


def simulate(
    cfg: RunConfig,
    run_dir: Path,
    resume: bool = False,
    client_cpus: float | None = None,
    client_app: Any = None,
    resume_from: int | None = None,
) -> ServerState:
    """Run (or resume) a federation; `client_app` replaces our ClientApp (tests inject faulty clients).
    `resume_from` continues from that round's checkpoint instead of the latest (implies resume). Nothing
    is written before the configuration and the checkpoint verify."""
    quiet_environment()
    run_dir = Path(run_dir)
    cfg = with_store(cfg, run_dir)
    start_round = None
    if resume or resume_from is not None:
        check_resume_config(run_dir, cfg)
        start_round = resume_round(run_dir, resume_from)
    elif latest_checkpoint(run_dir) is not None:
        raise FedpeftError(
            f"{run_dir} already holds a federation; pass --resume to continue it or use a new --out"
        )
    _check_data(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / "config.json", to_run_config(cfg))
    os.environ.setdefault("FLWR_HOME", str(run_dir.resolve() / "flwr"))

    from flwr.simulation import run_simulation

    from client.app import app as default_client_app
    from server.app import Outcome, make_server_app

    logging.getLogger("flwr").setLevel(logging.ERROR)
    cpus = os.cpu_count() or 1
    temp_dir = ray_temp_dir(run_dir)
    backend = {
        # One CPU share per client actor; by default one actor that owns every core and runs clients
        # one after another with all threads (on a small machine, parallel actors only thrash).
        "client_resources": {"num_cpus": client_cpus or cpus, "num_gpus": 0.0},
        "init_args": {
            "num_cpus": cpus,
            "num_gpus": 0,
            "_temp_dir": str(temp_dir),
            "include_dashboard": False,
            "logging_level": "error",
            "log_to_driver": True,
        },
    }
    outcome = Outcome()
    try:
        run_simulation(
            server_app=make_server_app(cfg, run_dir, start_round, outcome),
            client_app=client_app or default_client_app,
            num_supernodes=cfg.federation.clients,
            backend_config=backend,
        )
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
    if outcome.error:
        raise FedpeftError(outcome.error)
    if outcome.state is None:
        raise FedpeftError("the simulation ended without a result (see the log above)")
    return outcome.state


def summary(state: ServerState, method: str = "none") -> str:
    first, last = state.history[0], state.history[-1]
    per_client = last.get("bytes_up", 0) // max(len(last.get("accepted", [])), 1)
    line = (
        f"global adapter after round {state.round}: held-out ppl {first['eval_ppl']:.2f} -> {last['eval_ppl']:.2f}; "
        f"{per_client:,} bytes up per client in the last round"
    )
    if "personal" in last:
        from fedpeft.personalize import summary_line

        line += "\n" + summary_line(last["personal"], method)
    return line
