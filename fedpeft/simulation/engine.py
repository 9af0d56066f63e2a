"""Flower's simulation engine (Ray) in a session of its own, so that nothing it starts outlives the run.

`ray.init` starts a GCS server, a raylet, agents and worker processes as children of the driver, in the
driver's session. Killed with SIGKILL, a driver cannot stop them, and Ray's agents (DashboardAgent,
RuntimeEnvAgent) stay behind. So the driver runs in a child process that leads a new session, and every
process Ray starts belongs to that session:
- the command (the child's parent) stops the whole session when the run ends, fails or is interrupted;
- the driver watches its parent and stops its own session when the parent is gone (kill -9 of the command);
- RUN/ray-session.json names the session while it runs; the next start in the same run folder stops what
  an earlier run left (command and driver killed at once), by that session id and a marker in the
  processes' environment, never by name.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import json
import logging
import multiprocessing
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from fedpeft.atomic import atomic_write_json
from fedpeft.config.tree import RunConfig, sampled_per_round
from fedpeft.errors import FedpeftError
from fedpeft.log import quiet_environment, setup_console
from fedpeft.model.placement import actor_resources
from fedpeft.processes import session_members, stop_processes, stop_session

log = logging.getLogger("fedpeft")
SESSION_FILE = "ray-session.json"
MARKER = "FEDPEFT_RAY_TEMP_DIR"  # set in the driver's environment; every process Ray starts inherits it


def ray_temp_dir(run_dir: Path) -> Path:
    """Ray's temp folder under the run folder. Ray puts Unix sockets at
    <temp>/session_<date>_<time>_<usec>_<pid>/sockets/plasma_store (62 more bytes) and refuses paths over
    107 bytes, so a run folder deeper than 40 bytes gets a short temp folder instead (removed afterwards)."""
    candidate = run_dir.resolve() / "ray"
    if len(str(candidate)) <= 40:
        candidate.mkdir(parents=True, exist_ok=True)
        return candidate
    return Path(tempfile.mkdtemp(prefix="fedpeft-ray-"))


def reap_stale(run_dir: Path) -> int:
    """Stop the processes an earlier, killed run of this folder left; returns how many. Only members of
    the session it recorded that show they are that run's Ray (_belongs) are stopped: a reused session id
    is not ours to stop."""
    path = Path(run_dir) / SESSION_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return 0
    try:
        try:  # the run that wrote it holds a lock on it while it lives
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise FedpeftError(
                f"a federation is running in {run_dir} now; wait for it or stop it first"
            ) from None
        record = json.loads(path.read_text())
        sid, temp_dir = int(record["session"]), str(record["ray_temp_dir"])
    except (OSError, ValueError, KeyError, TypeError):
        sid, temp_dir = 0, ""
    finally:
        os.close(fd)
    if not _our_temp_dir(Path(run_dir), temp_dir):  # a record we did not write: touch nothing it names
        path.unlink(missing_ok=True)
        return 0
    ours = [p for p in session_members(sid) if _belongs(p, temp_dir)] if sid != os.getsid(0) else []
    if ours:
        stop_processes(ours)
        log.warning("stopped %d processes left in %s by an earlier run that was killed", len(ours), run_dir)
    path.unlink(missing_ok=True)
    shutil.rmtree(temp_dir, ignore_errors=True)
    return len(ours)


def _our_temp_dir(run_dir: Path, temp_dir: str) -> bool:
    """Only the two kinds of folder ray_temp_dir makes: RUN/ray, or a fedpeft-ray-* folder in the temp dir."""
    path = Path(temp_dir)
    if not temp_dir or not path.is_absolute():
        return False
    return path == run_dir.resolve() / "ray" or (
        path.parent.resolve() == Path(tempfile.gettempdir()).resolve()
        and path.name.startswith("fedpeft-ray-")
    )


def _belongs(pid: int, temp_dir: str) -> bool:
    """The process is this run's Ray: its environment carries the marker, or its command line or one of
    its open files (Ray's logs) is under the run's Ray temp folder. setproctitle rewrites the command line
    of Ray's agents and may blank their environment, but their log files stay open."""
    proc = Path(f"/proc/{pid}")
    try:
        if f"{MARKER}={temp_dir}".encode() in (proc / "environ").read_bytes().split(b"\0"):
            return True
        if temp_dir.encode() in (proc / "cmdline").read_bytes():
            return True
        return any(os.readlink(fd).startswith(temp_dir + "/") for fd in (proc / "fd").iterdir())
    except OSError:
        return False


def run_engine(
    cfg: RunConfig,
    run_dir: Path,
    resume: int | None,
    client_app: str,
) -> tuple[Any, str | None]:
    """Run the federation on Flower's simulation engine in its own session; returns (ServerState or None,
    error message or None). `client_app` is a "module:attribute" reference."""
    temp_dir = ray_temp_dir(run_dir)
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked threads or sockets
    receive, send = ctx.Pipe(duplex=False)
    level = log.level or logging.INFO
    args = (send, cfg, run_dir, resume, client_app, str(temp_dir), os.getpid(), level)
    driver = ctx.Process(target=_drive, args=args, name="fedpeft-simulation")
    driver.start()
    send.close()
    result: tuple[Any, str | None] | None = None
    lock = -1
    try:
        atomic_write_json(run_dir / SESSION_FILE, {"session": driver.pid, "ray_temp_dir": str(temp_dir)})
        lock = os.open(run_dir / SESSION_FILE, os.O_RDONLY)
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when this process ends, however it ends
        while result is None and (driver.is_alive() or receive.poll(0)):
            if receive.poll(0.5):
                try:
                    result = receive.recv()
                except EOFError:  # the driver died without a word
                    break
        driver.join(timeout=60)
    except BaseException:  # an interrupt: the user asked to stop, and hears one line (fedpeft.cli)
        if driver.is_alive():
            _silence(Path(temp_dir))
        raise
    finally:
        stop_session(driver.pid)  # the driver (if still there) and whatever Ray left
        (run_dir / SESSION_FILE).unlink(missing_ok=True)
        if lock >= 0:
            os.close(lock)
        shutil.rmtree(temp_dir, ignore_errors=True)
    if result is None:
        return None, f"the simulation ended without a result (exit code {driver.exitcode}; see the log above)"
    return result


# Flower's simulation engine polls the queue of every virtual node every 0.1 s in the driver (flwr 1.42,
# vce_api.add_messages_to_queue). With many nodes that loop keeps a core busy, and a client actor whose torch
# threads want every core stalls beside it. On 2 cores (benchmarks/federation.py scale) leaving that core
# to the engine made a round at 10,000 virtual clients many times faster and at 1,000 no faster; the
# threshold lies between, a judgement, not measured (benchmarks/README.md, "Federation scale").
ENGINE_BUSY_CLIENTS = 3000


def actor_threads(clients: int, threads: int, cpus: int) -> int:
    """Torch threads of a local client actor: its CPU share, one core left to Flower's engine from
    ENGINE_BUSY_CLIENTS virtual clients up."""
    if clients >= ENGINE_BUSY_CLIENTS and cpus > 1:
        threads = min(threads, cpus - 1)
    return threads


def backend_config(cfg: RunConfig, temp_dir: str) -> tuple[dict[str, Any], int]:
    """Flower's Ray backend settings and the local actors' torch threads. Locally: a private Ray instance
    in `temp_dir` with this machine's cores and GPUs; each actor's share from fedpeft.model.placement (on CPU by
    default one actor that owns every core and runs clients one after another with all threads: on a
    small machine parallel actors only thrash). On an existing cluster (--ray-address): the cluster's own
    resources and folders, --client-cpus (default 1) and --client-gpus per actor, so that every node with
    a CPU (or a GPU, under --device cuda) hosts actors."""
    f, device = cfg.federation, cfg.base.device
    quiet = {"logging_level": "error", "log_to_driver": True}
    if f.ray_address:
        gpus = (f.client_gpus or 1.0) if device == "cuda" else 0.0
        return {"client_resources": {"num_cpus": f.client_cpus or 1, "num_gpus": gpus},
                "init_args": {"address": f.ray_address, **quiet}}, 0  # fmt: skip
    cpus = os.cpu_count() or 1
    gpus = _gpu_count() if device == "cuda" else 0
    sampled = sampled_per_round(f.clients, f.fraction, f.min_clients)
    share = actor_resources(device, cpus, gpus, f.client_cpus, f.client_gpus, sampled)
    backend = {
        "client_resources": {"num_cpus": share.num_cpus, "num_gpus": share.num_gpus},
        "init_args": {
            "num_cpus": cpus,
            "num_gpus": gpus,
            "_temp_dir": temp_dir,
            "include_dashboard": False,
            **quiet,
        },
    }
    return backend, actor_threads(f.clients, share.threads, cpus)


AUTO_GROUP = 8  # clients per lockstep group by default on GPUs


def group_size(cfg: RunConfig, backend: dict[str, Any]) -> int:
    """Clients per actor trained in lockstep: --clients-per-actor, else on GPUs the clients sampled a round
    shared among the actors (at most AUTO_GROUP), and on CPUs 1: there one client's micro-batch already
    keeps the cores busy, so a stack of them took as long and the lockstep bookkeeping made a round slower
    (benchmarks/README.md, "Lockstep training"). Each actor still caps the group by its memory
    (Device.fit_many)."""
    f = cfg.federation
    if f.clients_per_actor:
        return f.clients_per_actor
    if f.client_quants:  # a lockstep group shares one base: clients of several quantizations train one by one
        return 1
    if float(backend["client_resources"].get("num_gpus") or 0) <= 0:
        return 1
    sampled = sampled_per_round(f.clients, f.fraction, f.min_clients)
    gpus = float(backend["init_args"].get("num_gpus") or 1)
    actors = max(1, int(gpus / float(backend["client_resources"]["num_gpus"]) + 1e-9))
    return max(1, min(AUTO_GROUP, -(-sampled // actors)))


def _gpu_count() -> int:
    import torch  # torch: only --device cuda counts GPUs; the command's start-up stays without it

    return torch.cuda.device_count()


# On an interrupt the command asks the driver to go quiet (a file in Ray's temp folder: a signal's blocked
# mask would be inherited by every process Ray starts) before it stops the driver's session: without it,
# every Ray worker's "SIGTERM received" and Flower's ActorUnavailableError traceback reached the terminal
# after the user had asked to stop.
QUIET_REQUEST, QUIET_ACK = "quiet-request", "quiet"


def _quiet_on_request(temp_dir: Path, every: float = 0.05) -> None:
    """In the driver: once QUIET_REQUEST appears, point this process's stdout and stderr at /dev/null (Ray's
    log monitor prints its workers' lines through them) and acknowledge with QUIET_ACK."""
    while not (temp_dir / QUIET_REQUEST).exists():
        time.sleep(every)
    devnull = os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2):
        os.dup2(devnull, fd)
    with contextlib.suppress(OSError):
        (temp_dir / QUIET_ACK).touch()


def _silence(temp_dir: Path, timeout: float = 2.0) -> None:
    """Ask the driver to go quiet and wait (at most `timeout` s) until it has."""
    try:
        (temp_dir / QUIET_REQUEST).touch()
    except OSError:
        return
    deadline = time.monotonic() + timeout
    while not (temp_dir / QUIET_ACK).exists() and time.monotonic() < deadline:
        time.sleep(0.02)


def _watch_parent(parent: int, run_dir: Path, temp_dir: str) -> None:
    """In the driver: when the command that started us is gone (killed), stop this whole session."""
    while os.getppid() == parent:
        time.sleep(0.5)
    stop_session(os.getsid(0), timeout=5.0, spare=os.getpid())
    (run_dir / SESSION_FILE).unlink(missing_ok=True)
    shutil.rmtree(temp_dir, ignore_errors=True)
    os._exit(137)


def _load(reference: str) -> Any:
    module, _, attribute = reference.partition(":")
    return getattr(importlib.import_module(module), attribute)


def _drive(
    send: Any,
    cfg: RunConfig,
    run_dir: Path,
    resume: int | None,
    client_app: str,
    temp_dir: str,
    parent: int,
    level: int,
) -> None:
    """The driver process: leads a new session, runs Flower's simulation, sends back (state, error)."""
    os.setsid()
    os.environ[MARKER] = temp_dir
    threading.Thread(target=_quiet_on_request, args=(Path(temp_dir),), daemon=True).start()
    threading.Thread(target=_watch_parent, args=(parent, run_dir, temp_dir), daemon=True).start()
    setup_console()
    log.setLevel(level)
    quiet_environment()
    try:
        # flwr.simulation, and Flower's ServerApp: in the driver only, after quiet_environment (Flower reads
        # it at import), and a failed import is reported as the simulation's failure
        from flwr.simulation import run_simulation

        from fedpeft.flower.server_app import Outcome, make_server_app

        # after the imports, which set Flower's console level: otherwise every run printed Flower's
        # "run_simulation is deprecated" (we drive its simulation engine on purpose: fedpeft/simulation/engine.py)
        logging.getLogger("flwr").setLevel(logging.ERROR)

        backend, threads = backend_config(cfg, temp_dir)
        from fedpeft.simulation.lockstep import install  # Flower's Ray backend: after flwr.simulation

        install(group_size(cfg, backend))
        if threads:  # local actors: their workers inherit this process's environment
            for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
                os.environ.setdefault(var, str(threads))  # a user's own setting wins
        outcome = Outcome()
        run_simulation(
            server_app=make_server_app(cfg, run_dir, resume, outcome),
            client_app=_load(client_app),
            num_supernodes=cfg.federation.clients,
            backend_config=backend,
        )
        send.send((outcome.state, outcome.error))
    except Exception as e:  # reported by the command, which exits non-zero
        log.exception("the simulation failed")
        send.send((None, f"the simulation failed: {type(e).__name__}: {e}"))
