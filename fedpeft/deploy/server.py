"""`fedpeft server`: a real Flower SuperLink plus our ServerApp, supervised until the federation ends.

Layout of the server folder (`--out`):
  config.json, metrics.jsonl, plot.png, global/, checkpoints/   the federation, as in `fedpeft simulate`
  status.json                                                 written by the ServerApp when it ends
  superlink/state.db                                          SuperLink state (SQLite): runs, registered nodes
  superlink/superlink.log, superlink/serverapp.log            logs
  superlink/flwr/                                             FLWR_HOME: the flwr CLI's connection, apps
  superlink/app/pyproject.toml                                the Flower app launched (our apps + this config)

If the SuperLink process dies, it is restarted on the same database (registered clients and their node
ids survive; SuperNodes reconnect on their own) and the federation resumes from its last checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import tomllib
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import tomli_w

from fedpeft.atomic import atomic_write_bytes
from fedpeft.config.files import flwr_app_table, overrides
from fedpeft.config.tree import RunConfig
from fedpeft.deploy.certs import CertPaths, check_server_files
from fedpeft.errors import FedpeftError
from fedpeft.federation.rounds import round_line
from fedpeft.federation.state import latest_checkpoint, open_run, plan_run, resume_round
from fedpeft.processes import (
    Child,
    descendants,
    executable,
    flower_env,
    flwr,
    port_in_use,
    process_table,
    stop_tree,
    wait_listening,
)

log = logging.getLogger("fedpeft")
CONNECTION = "fedpeft"  # the flwr CLI's name for our SuperLink
STATUS_FILE = "status.json"
RUN_CONFIG = "run-config.toml"  # the overrides of the current Flower run; deploy-local waits for it
PROJECT_ROOT = Path(__file__).resolve().parents[2]  # a source checkout's root (pyproject.toml), if any


@dataclass(frozen=True)
class ServerOptions:
    host: str = "127.0.0.1"  # 0.0.0.0 to accept clients from other machines
    port: int = 9092
    certs: Path | None = None  # a `fedpeft certs` folder: ca.pem, server.pem, server.key, clients/*.pub
    insecure: bool = False  # plain HTTP: only for trying things out on one machine
    auth: bool = True  # only registered client keys may join
    client_keys: tuple[Path, ...] = field(default_factory=tuple)  # .pub files; default certs/clients/*.pub
    restarts: int = 3  # SuperLink restarts before giving up
    poll: float = 1.0


@dataclass
class ServerResult:
    rounds: int
    history: list[dict[str, Any]]
    restarts: int


def _dial_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


def app_dir(fallback: Path, root: Path = PROJECT_ROOT) -> Path:
    """The Flower app to run: the project itself (its pyproject.toml, `flwr run .`) in a source checkout;
    installed from a wheel, `fallback` with a pyproject.toml holding the same `[tool.flwr.app]`."""
    try:
        project = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))
        if project["tool"]["flwr"]["app"] == flwr_app_table():
            return root
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        pass
    doc = {
        "project": {"name": "fedpeft", "version": version("fedpeft"), "license": "Apache-2.0"},
        "tool": {"flwr": {"app": flwr_app_table()}},
    }
    fallback.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(fallback / "pyproject.toml", tomli_w.dumps(doc).encode())
    # the one file `fab-include` names: Flower refuses to build a FAB when a pattern matches nothing
    atomic_write_bytes(
        fallback / "LICENSE", b"Apache-2.0: the license of the fedpeft package this app runs.\n"
    )
    return fallback


class Server:
    """One SuperLink process on a folder; start() again after a crash reuses the database."""

    def __init__(self, out: Path, opts: ServerOptions) -> None:
        self.out, self.opts = out.resolve(), opts
        self.dir = self.out / "superlink"
        self.home = self.dir / "flwr"
        self.env = flower_env(self.home)
        self.child: Child | None = None
        self.log_child: Child | None = None  # `flwr log --stream` into superlink/serverapp.log
        self.tree: list[int] = []  # the SuperLink's descendants, last seen (they outlive a killed SuperLink)
        self.serverapp = "not yet"  # our ServerApp process: "not yet" started, "running", or "gone"
        self.certs = CertPaths(opts.certs.resolve()) if opts.certs else None

    def check(self) -> None:
        o = self.opts
        if not o.insecure:
            if self.certs is None:
                raise FedpeftError(
                    "TLS needs --certs DIR (make one with `fedpeft certs`), or pass --insecure"
                )
            for p in (self.certs.ca, self.certs.server_cert, self.certs.server_key):
                if not p.is_file():
                    raise FedpeftError(
                        f"missing {p}: make the certificates with `fedpeft certs --out {self.certs.root}`"
                    )
            check_server_files(self.certs)
        if o.auth:
            if o.insecure:
                raise FedpeftError("node authentication needs TLS; drop --insecure or pass --no-auth")
            if not self.keys():
                raise FedpeftError(
                    "node authentication is on but there is no client public key to register "
                    "(--client-keys, or clients/*.pub in --certs); --no-auth to let any client join"
                )
        if port_in_use(o.host, o.port):
            raise FedpeftError(f"port {o.port} on {o.host} is already in use (--port)")

    def keys(self) -> list[Path]:
        if self.opts.client_keys:
            return list(self.opts.client_keys)
        return self.certs.client_pubs() if self.certs else []

    def start(self) -> None:
        o = self.opts
        self.dir.mkdir(parents=True, exist_ok=True)
        args = [
            executable("flower-superlink"),
            "--database",
            str(self.dir / "state.db"),
            "--host",
            o.host,
            "--port",
            str(o.port),
            # our ServerApp runs in this environment; never `uv sync` an app's dependencies at run time
            "--disable-runtime-dependency-installation",
        ]
        if o.insecure:
            args.append("--insecure")
        else:
            assert self.certs is not None
            args += [
                "--ssl-ca-certfile",
                str(self.certs.ca),
                "--ssl-certfile",
                str(self.certs.server_cert),
                "--ssl-keyfile",
                str(self.certs.server_key),
            ]
        if o.auth:
            args.append("--enable-supernode-auth")
        self.child = Child(args, self.dir / "superlink.log", self.env, "flower-superlink")
        wait_listening(_dial_host(o.host), o.port, self.child)
        self._write_connection()

    def _write_connection(self) -> None:
        conn: dict[str, Any] = {"address": f"{_dial_host(self.opts.host)}:{self.opts.port}"}
        if self.opts.insecure:
            conn["insecure"] = True
        else:
            assert self.certs is not None
            conn["root-certificates"] = str(self.certs.ca)
        self.home.mkdir(parents=True, exist_ok=True)
        doc = {"superlink": {"default": CONNECTION, CONNECTION: conn}}
        atomic_write_bytes(self.home / "config.toml", tomli_w.dumps(doc).encode())

    def register(self) -> int:
        """Register every client public key; the database keeps earlier registrations (a key registered
        before is answered "already in use"). Returns how many are new."""
        added = 0
        for pub in self.keys():
            if not pub.is_file():
                raise FedpeftError(f"client key {pub} does not exist")
            try:
                flwr(["supernode", "register", str(pub), CONNECTION], self.env)
            except FedpeftError as e:
                if "already in use" not in str(e):
                    raise
                continue
            added += 1
        return added

    def launch(self, cfg: RunConfig, resume: int | None) -> int:
        """Launch the federation as a Flower run of the project's app with the user's overrides (what
        differs from `[tool.flwr.app.config]`), continuing from the (verified) checkpoint of round `resume`
        if given; returns the run id."""
        run_config = {"out": str(self.out), "resume-round": -1 if resume is None else resume}
        run_config.update(overrides(cfg))
        file = self.dir / RUN_CONFIG
        atomic_write_bytes(file, tomli_w.dumps(run_config).encode())
        out = flwr(["run", str(app_dir(self.dir / "app")), CONNECTION, "--run-config", str(file)], self.env)
        run_id = int(out["run-id"])
        self._stream_log(run_id)
        return run_id

    def _stream_log(self, run_id: int) -> None:
        args = [executable("flwr"), "log", str(run_id), CONNECTION, "--stream"]
        self.log_child = Child(args, self.dir / "serverapp.log", self.env, "flwr log")

    def stop_run(self, run_id: int) -> None:
        with contextlib.suppress(FedpeftError):
            flwr(["stop", str(run_id), CONNECTION], self.env, timeout=30)

    def watch(self) -> bool:
        """Is the SuperLink alive? Remembers its process tree while it is, and whether our ServerApp
        process (a descendant, started per run) has been seen and is still there."""
        assert self.child is not None
        if not self.child.alive():
            return False
        table = process_table()
        self.tree = descendants(self.child.pid, table) or self.tree
        running = any("flwr-serverapp" in table[p].cmdline for p in self.tree if p in table)
        self.serverapp = "running" if running else ("gone" if self.serverapp != "not yet" else "not yet")
        return True

    def stop(self) -> None:
        for child in (self.log_child, self.child):
            if child is not None:
                child.stop()
        for pid in self.tree:  # a killed SuperLink's SuperExec and ServerApp: they must not write to `out`
            stop_tree(pid, timeout=5)
        self.tree = []


def _round_line(m: dict[str, Any]) -> str:
    refused = (
        [f"\n  refused {r['client']}: {r['reason']}" for r in m.get("rejected", [])] if m["round"] else []
    )
    return round_line(m) + "".join(refused)


def _read_lines(path: Path) -> list[dict[str, Any]]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError):
        return []


def run_server(
    cfg: RunConfig, out: Path, opts: ServerOptions, resume: bool = False, resume_from: int | None = None
) -> ServerResult:
    """Start the SuperLink, register the clients, run the federation to its end, stop everything.
    Nothing is written before the configuration and the checkpoint to resume from verify."""
    out = Path(out)
    start_round = plan_run(out, cfg, resume, resume_from)
    server = Server(out, opts)
    server.check()
    open_run(out, cfg, start_round)
    status = out / STATUS_FILE
    status.unlink(missing_ok=True)
    if opts.insecure:
        log.warning(
            "--insecure: traffic to and from clients is NOT encrypted; use it only on a trusted machine"
        )
    if not opts.auth:
        log.warning("--no-auth: any client that reaches the server may join the federation")
    try:
        run_id = _start(server, cfg, start_round)
        printed, restarts = _supervise(server, cfg, out, run_id)
    finally:
        server.stop()
    result = json.loads(status.read_text())
    history, _ = _print_rounds(out, printed)
    if result.get("state") != "finished":
        raise FedpeftError(result.get("error") or "the federation failed (see superlink/serverapp.log)")
    return ServerResult(int(result.get("round", 0)), history, restarts)


def _start(server: Server, cfg: RunConfig, start_round: int | None) -> int:
    """Start the SuperLink, register the client keys, launch the federation; returns the run id."""
    opts = server.opts
    server.start()
    if opts.auth:
        added = server.register()
        log.info("%d client keys registered (%d new)", len(server.keys()), added)
    run_id = server.launch(cfg, start_round)
    log.info(
        "SuperLink on %s:%d (%s%s); waiting for %d clients; logs in %s",
        opts.host,
        opts.port,
        "plain HTTP" if opts.insecure else "TLS",
        ", node authentication" if opts.auth else "",
        cfg.federation.clients,
        server.dir,
    )
    return run_id


def _print_rounds(out: Path, printed: int) -> tuple[list[dict[str, Any]], int]:
    """Print the round lines of metrics.jsonl past the first `printed`; returns the history and how many
    lines are printed now."""
    history = _read_lines(out / "metrics.jsonl")
    for m in history[printed:]:
        print(_round_line(m), flush=True)
    return history, max(printed, len(history))


def _supervise(server: Server, cfg: RunConfig, out: Path, run_id: int) -> tuple[int, int]:
    """Print the rounds as they end until the ServerApp writes its status; a SuperLink that exits is
    restarted. Returns the round lines printed and the restarts."""
    status = out / STATUS_FILE
    restarts, printed = 0, 0
    while True:
        _, printed = _print_rounds(out, printed)
        if status.is_file():
            return printed, restarts
        alive = server.watch()
        if server.serverapp == "gone" and not status.is_file():  # it died without writing its outcome
            time.sleep(server.opts.poll)  # (status.json is written before the process exits)
            if not status.is_file():
                raise FedpeftError(
                    f"the ServerApp ended without a result; see {server.dir / 'serverapp.log'}"
                )
        if not alive:
            run_id = _restart(server, cfg, out, run_id, restarts)
            restarts += 1
        time.sleep(server.opts.poll)


def _restart(server: Server, cfg: RunConfig, out: Path, run_id: int, restarts: int) -> int:
    """The SuperLink exited (after `restarts` restarts): start it again on the same state and relaunch the
    federation from its last checkpoint; returns the new run id."""
    opts = server.opts
    assert server.child is not None
    if restarts >= opts.restarts:
        raise FedpeftError(
            f"the SuperLink exited {restarts + 1} times; its log ({server.child.log_path}) ends:\n"
            + server.child.log_tail()
        )
    log.warning(
        "the SuperLink exited (code %s); restarting it on the same state (%d/%d)",
        server.child.proc.returncode,
        restarts + 1,
        opts.restarts,
    )
    server.stop()  # whatever it left behind (its ServerApp) must not write to `out` any more
    server.serverapp = "not yet"
    server.start()
    server.stop_run(run_id)
    # the checkpoints this run wrote itself; one the restart damaged stops with its reason
    resume_now = resume_round(out) if latest_checkpoint(out) is not None else None
    run_id = server.launch(cfg, resume_now)
    if resume_now is not None:
        log.info("federation resumed from %s", latest_checkpoint(out))
    return run_id
