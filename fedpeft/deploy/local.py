"""`fedpeft deploy-local`: a real deployment on one machine. Certificates, a TLS + node-auth server and N
clients, each a separate `fedpeft client` process with one user's text, all on loopback; everything
started is stopped at the end (or on Ctrl-C).

Folder (`--out`): certs/, the server folder (as `fedpeft server --out`), clients/NAME/{data.txt, store/,
client.log}.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

from fedpeft.atomic import atomic_write_bytes
from fedpeft.config.files import dumps_toml
from fedpeft.config.tree import RunConfig
from fedpeft.data.partition import partition
from fedpeft.data.records import to_jsonl
from fedpeft.data.users import device_config, find_user, load_users
from fedpeft.deploy.certs import CertPaths, make_certs
from fedpeft.deploy.server import RUN_CONFIG
from fedpeft.errors import FedpeftError
from fedpeft.federation.state import plan_run
from fedpeft.processes import Child, flower_env, free_port, port_in_use

log = logging.getLogger("fedpeft")


def _users(cfg: RunConfig) -> list[tuple[str, str, str]]:
    """(name, file name, content) of the users a natural-split simulation of this config would have as
    clients: their text, or their examples as JSONL records (fedpeft.data.records.to_records)."""
    from transformers import AutoTokenizer  # transformers: off the deploy commands' start-up path

    from fedpeft.model.base import resolve_base_dir  # torch: off the deploy commands' start-up path

    if cfg.federation.split != "natural":
        raise FedpeftError("deploy-local gives each client one user's own text: use --split natural")
    tokenizer = AutoTokenizer.from_pretrained(resolve_base_dir(cfg.base.model, cfg.base.cache_dir))
    chosen = partition(cfg.data, tokenizer, cfg.federation.clients, "natural")
    users = [find_user(load_users(cfg.data), user) for user in chosen.users]
    return [
        (u.user, "data.jsonl", to_jsonl(u.examples, cfg.data)) if u.examples else (u.user, "data.txt", u.text)
        for u in users
    ]


def deploy_local(
    cfg: RunConfig,
    out: Path,
    extra_server_args: list[str] | None = None,
    port: int | None = None,
    resume: bool = False,
    resume_from: int | None = None,
) -> int:
    """Run the federation of `cfg` as a local deployment; returns the server's exit code."""
    from fedpeft.model.base import resolve_base_dir  # torch: off the deploy commands' start-up path

    out = Path(out).resolve()
    cfg = device_config(cfg)  # the columns and label set every device reads its records with
    plan_run(out / "server", cfg, resume, resume_from)  # verify before certificates or logs are written
    users = _users(cfg)
    base_dir = resolve_base_dir(cfg.base.model, cfg.base.cache_dir)  # convert once, shared by all clients
    certs = make_certs(out / "certs", ["127.0.0.1", "localhost"], [name for name, _, _ in users])
    port = port or free_port()
    if port_in_use("127.0.0.1", port):
        raise FedpeftError(f"port {port} is already in use")
    env = flower_env(out / "flwr")
    server_args = _server_args(cfg, out, certs, port, resume, resume_from, extra_server_args)
    # N devices on one machine: each gets its share of the cores, as a real device has its own. Without
    # this, N processes x all-core OpenMP pools oversubscribe the CPU and training slows several times over
    # (benchmarks/README.md, "Deployment").
    threads = max(1, (os.cpu_count() or 1) // len(users))
    children: list[Child] = []
    server = Child(server_args, out / "server.log", env, "fedpeft server")
    children.append(server)
    try:
        _wait_for_server(server, out / "server", port)
        for name, file, content in users:
            home = out / "clients" / name
            home.mkdir(parents=True, exist_ok=True)
            data = home / file
            data.write_text(content, encoding="utf-8")
            args = _client_args(name, home, data, port, certs, base_dir, threads, cfg.federation.secagg)
            children.append(Child(args, home / "client.log", env, f"client {name}"))
        log.info(
            "server on 127.0.0.1:%d (TLS, node auth) and %d clients started; logs in %s",
            port,
            len(users),
            out,
        )
        _follow(server)
        return int(server.proc.returncode or 0)
    finally:
        for child in reversed(children):
            child.stop()


def _server_args(
    cfg: RunConfig,
    out: Path,
    certs: CertPaths,
    port: int,
    resume: bool,
    resume_from: int | None,
    extra: list[str] | None,
) -> list[str]:
    """`fedpeft server`'s command line; writes the config it runs: this one, without progress bars."""
    config_file = out / "server-config.toml"
    atomic_write_bytes(
        config_file, dumps_toml(replace(cfg, train=replace(cfg.train, progress=False))).encode()
    )
    return [
        sys.executable,
        "-m",
        "fedpeft.cli",
        "server",
        "--out",
        str(out / "server"),
        "--certs",
        str(certs.root),
        "--port",
        str(port),
        "--config",
        str(config_file),
        *(["--resume"] if resume else []),
        *(["--resume-from", str(resume_from)] if resume_from is not None else []),
        *(extra or []),
    ]


def _wait_for_server(server: Child, server_dir: Path, port: int) -> None:
    """Until the server listens and has launched the federation (its clients' keys registered)."""
    app = server_dir / "superlink" / RUN_CONFIG  # written at launch, once keys are registered
    deadline = time.monotonic() + 120
    while not (app.is_file() and port_in_use("127.0.0.1", port)):
        if not server.alive():
            raise FedpeftError(f"the server exited at start:\n{server.log_tail()}")
        if time.monotonic() > deadline:
            raise FedpeftError("the server did not start within 120 s")
        time.sleep(0.3)


def _client_args(
    name: str, home: Path, data: Path, port: int, certs: CertPaths, base_dir: Path, threads: int, secagg: bool
) -> list[str]:
    """`fedpeft client`'s command line for user `name`, its data in `data` and its store in `home`."""
    return [
        sys.executable,
        "-m",
        "fedpeft.cli",
        "client",
        "--server",
        f"127.0.0.1:{port}",
        "--root-cert",
        str(certs.ca),
        "--key",
        str(certs.client_key(name)),
        "--data",
        str(data),
        "--name",
        name,
        "--store",
        str(home / "store"),
        "--model",
        str(base_dir),
        "--threads",
        str(threads),
        # the devices of a secure federation send their updates only masked
        *(["--require-secagg"] if secagg else []),
    ]


def _follow(server: Child) -> None:
    """Echo the server's output (round lines) until it exits."""
    pos = 0
    while True:
        alive = server.alive()
        try:
            with open(server.log_path, "rb") as f:
                f.seek(pos)
                chunk = f.read()
                pos += len(chunk)
        except OSError:
            chunk = b""
        if chunk:
            sys.stdout.write(chunk.decode(errors="replace"))
            sys.stdout.flush()
        if not alive:
            return
        time.sleep(0.5)
