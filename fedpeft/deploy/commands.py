"""`fedpeft certs | server | client | deploy-local`: flags -> fedpeft.deploy, nothing else."""

from __future__ import annotations

import argparse
import logging
import shlex
from pathlib import Path

from fedpeft.config.flags import (
    add_config_flags,
    add_run_flags,
    config_from_args,
    field_value,
    local_section,
    print_config,
    require_out,
)
from fedpeft.errors import FedpeftError

log = logging.getLogger("fedpeft")


def add_deploy_commands(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser(
        "certs",
        help="make a CA, a TLS server certificate and client key pairs for a deployment",
        description="Create (or extend) a certificate folder: ca.pem/ca.key, server.pem/server.key with the "
        "given names, clients/NAME.key (stays on the device) and clients/NAME.pub (registered by the "
        "server). Existing files are never overwritten.",
    )
    add_config_flags(c, "certs")
    s = sub.add_parser(
        "server",
        help="start the aggregation server (Flower SuperLink + our ServerApp) and run a federation",
        description="Start a Flower SuperLink (TLS and node authentication by default, state in SQLite under "
        "--out), register the client keys, run the federation with our ServerApp until its last round, then "
        "stop. Writes metrics.jsonl, plot.png, global/ and checkpoints/ to --out, as simulate does.",
    )
    add_run_flags(
        add_config_flags(s, "server")["federation"],
        "server folder, required (an existing one needs --resume)",
    )
    k = sub.add_parser(
        "client",
        help="run an edge client (Flower SuperNode + our ClientApp) on this device's own text",
        description="Join a federation: fine-tune the adapter on this device's text when the server asks, send "
        "only the (masked) adapter delta. CPU only; no Ray needed (pip install fedpeft without extras). "
        "Reconnects when the server goes away and comes back.",
    )
    add_config_flags(k, "client")
    d = sub.add_parser(
        "deploy-local",
        help="a real deployment on this machine: TLS server + N client processes on loopback",
        description="Make certificates, start `fedpeft server` with TLS and node authentication and --clients "
        "`fedpeft client` processes (one user's text each, natural split), run the federation, stop "
        "everything. The quickest way to see a real deployment.",
    )
    add_run_flags(
        add_config_flags(d, "deploy-local")["federation"], "folder for certs/, server/ and clients/, required"
    )


def cmd_certs(a: argparse.Namespace) -> None:
    # cryptography: each command imports what it runs, not what the others do
    from fedpeft.deploy.certs import client_names, make_certs, server_cert_names

    o = local_section(a, "certs", "certs")
    names = client_names(o.clients)
    paths = make_certs(Path(o.out), list(o.san) or ["127.0.0.1", "localhost"], names)
    root = paths.root
    print(
        f"CA {paths.ca}; server certificate {paths.server_cert} for {', '.join(server_cert_names(paths.server_cert))}"
    )
    print(f"client keys in {root / 'clients'}: give each device its NAME.key and ca.pem, keep the .pub here")
    print("start the server (it registers every clients/*.pub):")
    print(
        f"  fedpeft server --certs {shlex.quote(str(root))} --out server --clients {len(names)} --fraction 1 --secagg"
    )
    print("on each device:")
    for name in names:
        print(
            f"  fedpeft client --server SERVER_HOST:9092 --root-cert ca.pem --key {name}.key "
            f"--data MY_TEXT --name {name} --require-secagg"
        )
    print("to add a client to a running server:")
    print(
        f"  FLWR_HOME=server/superlink/flwr flwr supernode register {shlex.quote(str(root / 'clients'))}/NAME.pub fedpeft"
    )


def cmd_server(a: argparse.Namespace) -> None:
    # numpy, cryptography: the server's side, imported by the command that runs it
    from fedpeft.deploy.server import ServerOptions, run_server
    from fedpeft.personal.strategies import method_label
    from fedpeft.simulation.run import summary

    if print_config(a, "server"):
        return
    require_out(a)
    cfg = config_from_args(a, "server")
    net = local_section(a, "server", "network")
    opts = ServerOptions(
        host=net.host,
        port=net.port,
        certs=Path(net.certs) if net.certs else None,
        insecure=net.insecure,
        auth=net.auth,
        client_keys=tuple(Path(p) for p in net.client_keys),
    )
    result = run_server(cfg, Path(a.out), opts, resume=a.resume, resume_from=a.resume_from)
    print(
        summary(result.rounds, result.history, method_label(cfg.personal))
        + f"\nserver folder {a.out} (metrics.jsonl, plot.png, global/)"
    )


def cmd_client(a: argparse.Namespace) -> None:
    # flwr: the SuperNode's side, imported by the command that runs it
    from fedpeft.deploy.client import ClientOptions, run_client

    opts = ClientOptions(
        connect=local_section(a, "client", "connect"),
        device=local_section(a, "client", "device"),
        model=field_value(a, "base.model") or "default",
    )
    code = run_client(opts)
    if code not in (0, 130, -15):
        raise FedpeftError(f"the SuperNode exited with code {code} (see the log above)")


def cmd_deploy_local(a: argparse.Namespace) -> None:
    # numpy, cryptography: imported by the command that runs it
    from fedpeft.deploy.local import deploy_local

    if print_config(a, "deploy-local"):
        return
    require_out(a)
    cfg = config_from_args(a, "deploy-local")
    port = field_value(a, "network.port")  # None: a free one
    code = deploy_local(cfg, Path(a.out), port=port, resume=a.resume, resume_from=a.resume_from)
    if code != 0:
        raise FedpeftError(f"the server failed (exit code {code}); see {Path(a.out) / 'server.log'}")


COMMANDS = {"certs": cmd_certs, "server": cmd_server, "client": cmd_client, "deploy-local": cmd_deploy_local}
