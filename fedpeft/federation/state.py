"""The server's side of a federation, without Flower: state, client sampling, checking replies,
aggregation, checkpoints, metrics. fedpeft.federation.loop moves messages; what it decides lives here and in
fedpeft.federation.roster (registration), fedpeft.federation.rounds and fedpeft.federation.evaluation (a round's outcome and metrics).

The server never loads the base model. It knows the adapter schema and the base fingerprint from
the clients' self-description at round 0, and refuses any reply that does not match them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from fedpeft.atomic import atomic_dir, atomic_write_json, manifest_problem, write_manifest
from fedpeft.config.files import from_run_config, to_run_config
from fedpeft.config.tree import RunConfig, sampled_per_round
from fedpeft.errors import FedpeftError
from fedpeft.federation.aggregate import Arrays, divide, server_update, weighted_sum
from fedpeft.federation.ranks import coverage, divide_by_slice, travel_rank
from fedpeft.federation.sinks import check_trackers, record
from fedpeft.model.adapter_files import AdapterDescription, adapter_meta, names_base, write_adapter_dir
from fedpeft.model.fed_sb import fold
from fedpeft.privacy.plan import plan

CHECKPOINTS = "checkpoints"
STATE_FILE = "state.json"
GLOBAL_FILE = "global.safetensors"
OPT_FILE = "optimizer.safetensors"
CHECKPOINT_FILES = (GLOBAL_FILE, OPT_FILE, STATE_FILE)  # each must match the manifest's sha256


@dataclass
class ServerState:
    """Everything needed to continue a federation after a crash."""

    round: int  # last completed round (0 = initial adapter)
    arrays: Arrays  # the whole global adapter, under PEFT keys
    opt_state: Arrays  # server-optimizer moments, "m/<key>", "v/<key>"
    info: AdapterDescription  # base fingerprint, schema, travel keys, PEFT config: from registration
    history: list[dict[str, Any]] = field(default_factory=list)  # metrics of completed rounds

    @property
    def travel_keys(self) -> list[str]:
        return self.info.travel_keys

    def travel_arrays(self) -> Arrays:
        return {k: self.arrays[k] for k in self.travel_keys}


def initial_state(description: AdapterDescription, init: Arrays) -> ServerState:
    return ServerState(round=0, arrays=dict(sorted(init.items())), opt_state={}, info=description)


def client_seed(seed: int, rnd: int, client: int) -> int:
    """Each (round, client) trains with its own seed, independent of which process runs it: this is
    what makes a resumed run equal an uninterrupted one."""
    return int(np.random.default_rng([seed, rnd, client]).integers(2**31 - 1))


def sample_clients(num_clients: int, fraction: float, min_clients: int, seed: int, rnd: int) -> list[int]:
    """Client indices for round `rnd`: a function of (seed, round) only, so a resumed run samples the same."""
    k = sampled_per_round(num_clients, fraction, min_clients)
    rng = np.random.default_rng([seed, rnd, 7])
    return sorted(int(i) for i in rng.choice(num_clients, size=k, replace=False))


def check_update(
    delta: Arrays, fingerprint: str, num_examples: float, state: ServerState, source: str = ""
) -> str | None:
    """Why a client's reply must be refused, or None. Its base must be the federation's: the same source
    weights, or the exact quantized base where the federation pins one (fedpeft.model.fingerprint). Names,
    shapes and dtypes must equal the schema."""
    if not names_base(state.info.fingerprint, fingerprint, source):
        return (
            f"base fingerprint {fingerprint[:12]} differs from the federation's {state.info.fingerprint[:12]}"
        )
    expected = {n: (tuple(s), d) for n, s, d in state.info.schema if n in state.travel_keys}
    if sorted(delta) != sorted(expected):
        missing, extra = sorted(set(expected) - set(delta)), sorted(set(delta) - set(expected))
        return f"schema differs: {len(missing)} missing, {len(extra)} unexpected tensors"
    for name, arr in delta.items():
        if (tuple(arr.shape), str(arr.dtype)) != expected[name]:
            return f"schema differs: {name} is {tuple(arr.shape)} {arr.dtype}, expected {expected[name][0]} {expected[name][1]}"
        if not np.all(np.isfinite(arr)):
            return f"non-finite values in {name}"
    if not (num_examples > 0 and math.isfinite(num_examples)):
        return f"invalid example count {num_examples}"
    return None


def aggregate_round(
    state: ServerState,
    deltas: list[Arrays],
    weights: list[float],
    cfg: RunConfig,
    ranks: list[int] | None = None,
) -> ServerState:
    """Weighted mean of the deltas (from their sum only) -> server optimizer -> the next state. With each
    client's LoRA rank, each rank slice is averaged over the clients that train it (fedpeft.federation.ranks)."""
    total = weighted_sum(deltas, weights)
    if ranks:
        cover = coverage(ranks, weights, travel_rank(state.info.schema, state.travel_keys))
        return apply_mean(state, divide_by_slice(total, cover, float(sum(weights))), cfg)
    return apply_mean(state, divide(total, float(sum(weights))), cfg)


def apply_mean(state: ServerState, mean_delta: Arrays, cfg: RunConfig) -> ServerState:
    """The server optimizer's step on a mean delta (plain or from secure aggregation) -> the next state."""
    arrays, opt_state = server_update(state.arrays, mean_delta, cfg.server_opt, state.opt_state)
    return ServerState(state.round + 1, arrays, opt_state, state.info, state.history)


def skip_round(state: ServerState) -> ServerState:
    """The state after a round that changed nothing (too few valid replies, an aborted secure sum)."""
    return ServerState(state.round + 1, state.arrays, state.opt_state, state.info, state.history)


def check_same_adapter(state: ServerState, description: AdapterDescription, checkpoint: Path) -> None:
    """A resumed federation must run on the base and adapter schema of its checkpoint."""
    if state.info.fingerprint != description.fingerprint or state.info.schema != description.schema:
        raise FedpeftError(f"checkpoint {checkpoint} is from another base or adapter schema")


# --- files -------------------------------------------------------------------------------------------


def write_global(run_dir: Path, state: ServerState) -> Path:
    """The current global adapter as a PEFT folder (`fedpeft export RUN/global` works on it); a Fed-SB adapter
    as the plain LoRA it equals (its checkpoints keep the r x r matrices a resume continues from)."""
    info = state.info
    arrays, adapter = state.arrays, info.adapter
    if adapter.lora_sb:
        arrays, adapter = fold(arrays), dataclasses.replace(adapter, lora_sb=False, r=adapter.rank)
    meta = adapter_meta(
        info.fingerprint,
        info.base_path,
        info.quant,
        adapter,
        arrays,
        round=state.round,
        base=info.base,
        # the (epsilon, delta) this adapter was trained under, so every copy of it says so
        **({"dp": state.history[-1]["dp"]} if state.history and state.history[-1].get("dp") else {}),
    )
    return write_adapter_dir(run_dir / "global", arrays, info.peft_config, meta)


def save_checkpoint(run_dir: Path, state: ServerState, cfg: RunConfig) -> Path:
    """checkpoints/round-NNN/: global adapter, optimizer state, round, RNG seed, history; atomic."""
    dest = checkpoint_path(run_dir, state.round)
    with atomic_dir(dest) as tmp:
        save_file(state.arrays, tmp / GLOBAL_FILE)
        save_file(state.opt_state, tmp / OPT_FILE)
        # Sampling and local seeds are functions of (seed, round): the RNG state is the seed plus the round.
        doc = {
            "round": state.round,
            "info": state.info.to_json(),
            "history": state.history,
            "rng": {"seed": cfg.federation.seed, "next_round": state.round + 1},
        }
        (tmp / STATE_FILE).write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
        write_manifest(tmp)  # the sha256 of each file, verified before a resume trains on any of them
    return dest


def save_round(run_dir: Path, state: ServerState, cfg: RunConfig) -> None:
    """After each round (0 included): its checkpoint, the global adapter folder, the metrics to every sink
    (fedpeft.federation.sinks: metrics.jsonl, plot.png, the trackers --log-to names)."""
    save_checkpoint(run_dir, state, cfg)
    write_global(run_dir, state)
    record(run_dir, state.history, cfg)
    prune_checkpoints(run_dir, cfg.federation.keep_checkpoints)


def prune_checkpoints(run_dir: Path, keep: int) -> list[Path]:
    """Delete all but the checkpoints of the `keep` latest rounds (0: keep all). Runs after the latest
    was written whole (atomic_dir), so what a resume needs is always among those kept; checkpoints that
    a --resume-from set aside (discard_after) are not rounds and stay."""
    if keep <= 0:
        return []
    rounds = _checkpoints(run_dir)
    old = [rounds[r] for r in sorted(rounds)[:-keep]]
    for path in old:
        shutil.rmtree(path)
    return old


def _checkpoints(run_dir: Path) -> dict[int, Path]:
    root = Path(run_dir) / CHECKPOINTS
    found = (
        [p for p in root.glob("round-*") if re.fullmatch(r"round-\d{3,}", p.name)] if root.is_dir() else []
    )
    return {int(p.name.removeprefix("round-")): p for p in sorted(found, key=lambda p: int(p.name[6:]))}


def latest_checkpoint(run_dir: Path) -> Path | None:
    rounds = _checkpoints(run_dir)
    return rounds[max(rounds)] if rounds else None


def resume_round(run_dir: Path, wanted: int | None = None) -> int:
    """The round a resume starts from (`wanted`, or the latest), after its checkpoint verified against its
    manifest. Raises a one-line FedpeftError naming the damaged file and the last round that verifies;
    reads only, so a refused resume leaves every file as it was."""
    rounds = _checkpoints(run_dir)
    if not rounds:
        raise FedpeftError(f"no checkpoint to resume in {run_dir}")
    rnd = max(rounds) if wanted is None else wanted
    if rnd not in rounds:
        raise FedpeftError(
            f"no checkpoint of round {rnd} in {run_dir} (it has rounds {min(rounds)} to {max(rounds)})"
        )
    problem = manifest_problem(rounds[rnd], CHECKPOINT_FILES)
    if problem is None:
        return rnd
    intact = next(
        (
            r
            for r in sorted(rounds, reverse=True)
            if r < rnd and manifest_problem(rounds[r], CHECKPOINT_FILES) is None
        ),
        None,
    )
    hint = (
        f"the last round that verifies is {intact}: resume from it with --resume-from {intact}"
        if intact is not None
        else "no earlier round verifies"
    )
    raise FedpeftError(f"corrupt checkpoint {rounds[rnd]}: {problem}; {hint}")


def discard_after(run_dir: Path, rnd: int) -> list[Path]:
    """Move the checkpoints of rounds after `rnd` to checkpoints/discarded-after-NNN-<time>/ (kept, not
    deleted): a run resumed from `rnd` trains them again, and a later resume must not pick them up."""
    later = [p for r, p in _checkpoints(run_dir).items() if r > rnd]
    if later:
        dest = Path(run_dir) / CHECKPOINTS / f"discarded-after-{rnd:03d}-{time.strftime('%Y%m%d-%H%M%S')}"
        dest.mkdir(parents=True)
        for p in later:
            p.rename(dest / p.name)
    return later


def checkpoint_path(run_dir: Path, rnd: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"round-{rnd:03d}"


def load_checkpoint(path: Path) -> ServerState:
    """Read one checkpoint after verifying every file's sha256; any defect is a one-line FedpeftError (the
    files are left as they are)."""
    problem = manifest_problem(path, CHECKPOINT_FILES)
    if problem is not None:
        raise FedpeftError(f"corrupt checkpoint {path}: {problem}")
    try:
        doc = json.loads((path / STATE_FILE).read_text())
        arrays = load_file(path / GLOBAL_FILE)
        opt_state = load_file(path / OPT_FILE)
        state = ServerState(
            int(doc["round"]),
            dict(sorted(arrays.items())),
            opt_state,
            AdapterDescription.from_json(doc["info"]),
            doc["history"],
        )
    except Exception as e:  # missing file, truncated safetensors, bad JSON, missing key
        raise FedpeftError(
            f"corrupt checkpoint {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from None
    expected = sorted(n for n, _, _ in state.info.schema)
    if sorted(state.arrays) != expected:
        raise FedpeftError(f"corrupt checkpoint {path}: its adapter does not match its schema")
    return state


def write_metrics(run_dir: Path, history: list[dict[str, Any]]) -> None:
    """metrics.jsonl (one object per round) and plot.png, rewritten whole from the history (so a resumed
    run never repeats or loses a round); no tracker."""
    record(run_dir, history)


def check_resume_config(run_dir: Path, cfg: RunConfig) -> None:
    """A run may be resumed with more rounds, but nothing else may change."""
    path = run_dir / "config.json"
    if not path.is_file():
        raise FedpeftError(f"nothing to resume in {run_dir} (no config.json)")
    try:
        saved = from_run_config(json.loads(path.read_text()))
    except (ValueError, TypeError) as e:
        raise FedpeftError(f"unreadable {path}: {e}") from None
    # the rank resolved on both sides: a run saved with --lora-r 8 (before the rank had a per-kind default)
    # resumes without it, and the other way round
    resolved = [
        dataclasses.replace(c, adapter=dataclasses.replace(c.adapter, r=c.adapter.rank)) for c in (cfg, saved)
    ]
    ours, theirs = (to_run_config(c) for c in resolved)
    changed = sorted(k for k in ours if ours[k] != theirs.get(k) and k not in RESUMABLE)
    if changed:
        raise FedpeftError(f"--resume with another configuration ({', '.join(changed[:3])}); use a new --out")


# options a resumed run may change: they do not change what it computes
RESUMABLE = (
    "federation.rounds",
    "train.progress",
    "federation.keep_checkpoints",
    "base.full_base",
    "base.base_id",
    # where it runs: a run interrupted on a GPU machine may continue on another machine
    "base.device",
    "base.compute_dtype",  # not in the fingerprint: a run may continue on a machine that computes otherwise
    "federation.client_cpus",
    "federation.client_gpus",
)


def plan_run(run_dir: Path, cfg: RunConfig, resume: bool, resume_from: int | None) -> int | None:
    """The round a federation in `run_dir` starts after (None: a new one), verified before anything is
    written: a resumed run keeps its configuration and has a checkpoint that verifies; a new one does not
    overwrite a folder that holds a federation. `simulate`, `server` and `deploy-local` all start here."""
    check_trackers(cfg)  # a --log-to tracker whose package is missing: refused before anything runs
    if resume or resume_from is not None:
        check_resume_config(run_dir, cfg)
        return resume_round(run_dir, resume_from)
    if latest_checkpoint(run_dir) is not None:
        raise FedpeftError(
            f"{run_dir} already holds a federation; pass --resume to continue it or use a new --out"
        )
    if cfg.privacy.mode != "off":  # a DP budget no noise can hold is refused before any file is written
        plan(cfg, cfg.federation.clients)
    return None


def open_run(run_dir: Path, cfg: RunConfig, start_round: int | None) -> None:
    """Once every check passed: the folder, later checkpoints set aside, the run's config.json."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if start_round is not None:
        discard_after(run_dir, start_round)
    atomic_write_json(run_dir / "config.json", to_run_config(cfg))
