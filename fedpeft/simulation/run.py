"""`fedpeft simulate`: a federation of virtual clients on Flower's simulation engine (Ray), loopback only."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from fedpeft.config.tree import RunConfig
from fedpeft.errors import FedpeftError
from fedpeft.federation.evaluation import changes_text
from fedpeft.federation.forgetting import reference_blocks
from fedpeft.federation.kinds import by_quant
from fedpeft.federation.metrics import RoundMetrics, as_metrics
from fedpeft.federation.personal_summary import summary_line
from fedpeft.federation.ranks import by_rank
from fedpeft.federation.state import ServerState, open_run, plan_run
from fedpeft.federation.task_eval import task_summary
from fedpeft.log import quiet_environment
from fedpeft.model.placement import with_device
from fedpeft.personal.store import check_store
from fedpeft.personal.strategies import strategy_for
from fedpeft.privacy.plan import summary as dp_summary
from fedpeft.simulation.engine import backend_config, reap_stale, run_engine

log = logging.getLogger("fedpeft")


def _check_data(cfg: RunConfig) -> None:
    """Fail before Ray starts if the data cannot form the clients or the reference text cannot be read
    (needs the tokenizer only)."""
    # transformers, torch: the simulation's own checks; `fedpeft server` imports summary without them
    from transformers import AutoTokenizer

    from fedpeft.data.partition import partition
    from fedpeft.model.base import resolve_base_dir

    tokenizer = AutoTokenizer.from_pretrained(resolve_base_dir(cfg.base.model, cfg.base.cache_dir))
    reference_blocks(cfg.data, tokenizer)  # a --reference-text that is missing or not text, before Ray starts
    f = cfg.federation
    clients = partition(cfg.data, tokenizer, f.clients, f.split, f.dirichlet_alpha, f.seed)
    tokens = [clients.tokens(i) for i in range(len(clients))]
    log.info(
        "%d clients (%s split), %d-%d training tokens each", len(clients), f.split, min(tokens), max(tokens)
    )


def _precision_note(cfg: RunConfig) -> None:
    """Say what the clients will compute in, before Ray starts: each actor chooses for itself, on this
    machine from the same cached measurement (fedpeft.model.precision). On a Ray cluster each node chooses."""
    if cfg.federation.ray_address:
        log.info(
            "compute dtype: --compute-dtype %s, chosen by each Ray node for itself", cfg.base.compute_dtype
        )
        return
    from fedpeft.model.base import preview_precision  # torch: see _check_data

    threads = backend_config(cfg, "")[1]  # the actors' torch threads: the speeds depend on them
    log.info("clients %s", preview_precision(cfg.base, threads).line())


def with_store(cfg: RunConfig, run_dir: Path) -> RunConfig:
    """Personalization without --store keeps one personal store per virtual client in RUN/personal."""
    check_store(cfg)
    if not strategy_for(cfg).personal:
        return cfg
    if cfg.personal.store:  # a relative --store is the caller's, not Ray's working folder's
        return replace(
            cfg, personal=replace(cfg.personal, store=str(Path(cfg.personal.store).expanduser().resolve()))
        )
    return replace(cfg, personal=replace(cfg.personal, store=str(Path(run_dir).resolve() / "personal")))


def simulate(
    cfg: RunConfig,
    run_dir: Path,
    resume: bool = False,
    client_app: str = "fedpeft.flower.client_app:app",
    resume_from: int | None = None,
) -> ServerState:
    """Run (or resume) a federation; `client_app` ("module:attribute") replaces our ClientApp (tests
    inject faulty clients).
    `resume_from` continues from that round's checkpoint instead of the latest (implies resume). Nothing
    is written before the configuration and the checkpoint verify."""
    quiet_environment()
    run_dir = Path(run_dir)
    reap_stale(run_dir)  # an earlier run of this folder that was killed may have left Ray running
    cfg = with_device(with_store(cfg, run_dir))
    start_round = plan_run(run_dir, cfg, resume, resume_from)
    _check_data(cfg)
    _precision_note(cfg)
    open_run(run_dir, cfg, start_round)
    os.environ.setdefault("FLWR_HOME", str(run_dir.resolve() / "flwr"))
    state, error = run_engine(cfg, run_dir, start_round, client_app)
    if error:
        raise FedpeftError(error)
    return state


def summary(rnd: int, history: Sequence[RoundMetrics | Mapping[str, Any]], method: str = "none") -> str:
    """The closing lines of a federation (simulated or deployed)."""
    first, last = as_metrics(history[0]), as_metrics(history[-1])
    per_client = (last.bytes_up or 0) // max(len(last.accepted or []), 1)
    changes = changes_text(last)
    if last.eval_ppl is None:  # every client's evaluation of the last round failed
        line = f"global adapter after round {rnd}: not evaluated (every client's evaluation failed)"
    else:
        before = last.base_ppl if last.base_ppl is not None else first.eval_ppl
        line = (
            f"global adapter after round {rnd}: {task_summary(last.task.to_json())}; answer ppl "
            if last.task
            else f"global adapter after round {rnd}: held-out ppl "
        )
        line += (
            # on the same clients: a sampled last round names the base's figure on its own sample
            (f"{before:.2f} -> " if before is not None else "")
            + f"{last.eval_ppl:.2f}"
            + (f" ({changes})" if changes else "")
        )
    if last.full_eval_ppl is not None:
        line += f"; on the {last.full_base} base {last.full_eval_ppl:.2f} (what a merge gives)"
    if last.reference_ppl is not None:  # how much general ability the adapter kept (federation.forgetting)
        line += (
            f"; reference text ppl {last.reference_ppl:.2f} (the base {last.base_reference_ppl:.2f}, "
            f"{last.forgetting:+.1f}%)"
        )
    line += f"; {per_client:,} bytes up per client in the last round"
    groups = by_rank([as_metrics(m) for m in history])
    if groups:  # devices of different LoRA ranks: what each kind got (fedpeft.federation.ranks)
        line += "\nby LoRA rank, held-out ppl: " + "; ".join(
            f"rank {r} {g['ppl_start']:.2f} -> {g['ppl']:.2f} ({g['clients']:.0f} clients)"
            for r, g in groups.items()
        )
        if last.effective_rank is not None:
            line += f"; the global adapter's effective rank {last.effective_rank:.1f}"
    if quants := by_quant([as_metrics(m) for m in history]):  # devices of several quantizations of the base
        line += "\nby quantization, held-out ppl: " + "; ".join(
            f"{q} {g['ppl_start']:.2f} -> {g['ppl']:.2f} ({g['clients']:.0f} clients)"
            for q, g in quants.items()
        )
    line += dp_summary(last.to_json())  # under DP: the (ε, δ) the adapter was trained under
    if last.personal is not None:
        line += "\n" + summary_line(last.personal, method)
    return line
