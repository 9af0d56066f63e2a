"""`fedpeft certs | server | client | deploy-local`: flags -> fedpeft.deploy, nothing else."""

from __future__ import annotations

import argparse
import logging
import shlex
from pathlib import Path

from fedpeft.config.flags import (
    add_config_flags,
    add_field_flag,
    add_run_flags,
    config_from_args,
    field_value,
    print_config,
    require_out,
)
from fedpeft.errors import FedpeftError
from fedpeft.secagg.protocol import MIN_NEIGHBOURS

log = logging.getLogger("fedpeft")


def add_deploy_commands(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser(
        "certs",
        help="make a CA, a TLS server certificate and client key pairs for a deployment",
        description="Create (or extend) a certificate folder: ca.pem/ca.key, server.pem/server.key with the "
        "given names, clients/NAME.key (stays on the device) and clients/NAME.pub (registered by the "
        "server). Existing files are never overwritten.",
    )
    c.add_argument("--out", default="certs", metavar="DIR", help="certificate folder (default: %(default)s)")
    c.add_argument(
        "--san",
        action="append",
        metavar="NAME",
        help="an IP address or host name clients use to reach the server; repeat for several "
        "(default: 127.0.0.1 and localhost)",
    )
    c.add_argument(
        "--clients",
        default="3",
        metavar="N|NAME,NAME",
        help="client key pairs to make: a count (client-1..client-N) or names (default: %(default)s)",
    )

    s = sub.add_parser(
        "server",
        help="start the aggregation server (Flower SuperLink + our ServerApp) and run a federation",
        description="Start a Flower SuperLink (TLS and node authentication by default, state in SQLite under "
        "--out), register the client keys, run the federation with our ServerApp until its last round, then "
        "stop. Writes metrics.jsonl, plot.png, global/ and checkpoints/ to --out, as simulate does.",
    )
    g = add_config_flags(s, "server")["federation"]
    add_run_flags(g, "server folder, required (an existing one needs --resume)")
    n = s.add_argument_group("network and security")
    n.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on; 0.0.0.0 for clients on other machines (default: %(default)s)",
    )
    n.add_argument("--port", type=int, default=9092, help="port to listen on (default: %(default)s)")
    n.add_argument(
        "--certs",
        default=None,
        metavar="DIR",
        help="folder from `fedpeft certs` (ca.pem, server.pem, server.key)",
    )
    n.add_argument(
        "--insecure", action="store_true", help="no TLS: traffic in clear text (for local trials only)"
    )
    n.add_argument("--no-auth", action="store_true", help="let any client join (no node authentication)")
    n.add_argument(
        "--client-keys",
        nargs="+",
        default=None,
        metavar="PUB",
        help="client public keys to register (default: clients/*.pub in --certs)",
    )

    k = sub.add_parser(
        "client",
        help="run an edge client (Flower SuperNode + our ClientApp) on this device's own text",
        description="Join a federation: fine-tune the adapter on this device's text when the server asks, send "
        "only the (masked) adapter delta. CPU only; no Ray needed (pip install fedpeft without extras). "
        "Reconnects when the server goes away and comes back.",
    )
    k.add_argument("--server", required=True, metavar="HOST:PORT", help="the server's address")
    k.add_argument("--root-cert", default=None, metavar="PEM", help="ca.pem from `fedpeft certs` (TLS)")
    k.add_argument(
        "--key", default=None, metavar="KEY", help="this device's private key, clients/NAME.key (auth)"
    )
    k.add_argument(
        "--data", required=True, metavar="PATH", help="this device's text: a .txt file or a folder of them"
    )
    k.add_argument(
        "--store",
        default="fedpeft-store",
        metavar="DIR",
        help="local store for the converted base and this client's state (default: %(default)s)",
    )
    k.add_argument(
        "--name", default="", help="user name the server sees (default: the data file or folder name)"
    )
    k.add_argument(
        "--model",
        default="default",
        metavar="default|tiny|PATH",
        help="this device's copy of the base; it must match the server's fingerprint (default: %(default)s)",
    )
    k.add_argument(
        "--insecure", action="store_true", help="no TLS (only against a server started with --insecure)"
    )
    k.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="CPU threads for training (default: all cores; set it when devices share a machine)",
    )
    k.add_argument(
        "--max-memory",
        type=int,
        default=0,
        metavar="MiB",
        help="memory the training process may use: micro-batches that fit it, the same effective batch; "
        "a budget too small is refused naming the smallest that works (default: no limit)",
    )
    add_field_flag(k, "base.compute_dtype", "the federation's, whose auto this device resolves itself")
    sec = k.add_argument_group("this device's protection (the server cannot lower it)")
    sec.add_argument(
        "--require-secagg",
        action="store_true",
        help="refuse plain training rounds: an update leaves this device only masked by secure aggregation",
    )
    sec.add_argument(
        "--min-neighbours",
        type=int,
        default=MIN_NEIGHBOURS,
        metavar="K",
        help="refuse a secure round that would mask this device's update with fewer than K other clients, or "
        "whose threshold the server and K-1 colluding clients could get around (default: %(default)s)",
    )
    sec.add_argument(
        "--dp-min-local-noise",
        type=float,
        default=0.0,
        metavar="Z",
        help="send updates only under --dp distributed, adding at least Z x the sensitivity of discrete "
        "Gaussian noise itself: what protects this device's text even if every other client colludes with "
        "the server (default: no floor)",
    )
    k.add_argument(
        "--max-wait",
        type=float,
        default=None,
        metavar="S",
        help="give up after S seconds without the server (default: keep trying)",
    )

    d = sub.add_parser(
        "deploy-local",
        help="a real deployment on this machine: TLS server + N client processes on loopback",
        description="Make certificates, start `fedpeft server` with TLS and node authentication and --clients "
        "`fedpeft client` processes (one user's text each, natural split), run the federation, stop "
        "everything. The quickest way to see a real deployment.",
    )
    g = add_config_flags(d, "deploy-local")["federation"]
    add_run_flags(g, "folder for certs/, server/ and clients/, required")
    g.add_argument("--port", type=int, default=None, help="server port (default: a free one)")


def cmd_certs(a: argparse.Namespace) -> None:
    from fedpeft.deploy.certs import client_names, make_certs, server_cert_names

    names = client_names(a.clients)
    paths = make_certs(Path(a.out), a.san or ["127.0.0.1", "localhost"], names)
    root = paths.root
    print(
        f"CA {paths.ca}; server certificate {paths.server_cert} for {', '.join(server_cert_names(paths.server_cert))}"
    )
    print(f"client keys in {root / 'clients'}: give each device its NAME.key and ca.pem, keep the .pub here")
    print("start the server (it registers every clients/*.pub):")
    print(f"  fedpeft server --certs {shlex.quote(str(root))} --out server --clients {len(names)} --secagg")
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
    from fedpeft.deploy.server import ServerOptions, run_server
    from fedpeft.personal.methods import method_label
    from fedpeft.simulation.run import summary

    if print_config(a, "server"):
        return
    require_out(a)
    cfg = config_from_args(a, "server")
    opts = ServerOptions(
        host=a.host,
        port=a.port,
        certs=Path(a.certs) if a.certs else None,
        insecure=a.insecure,
        auth=not a.no_auth,
        client_keys=tuple(Path(p) for p in a.client_keys or ()),
    )
    if not 0 < a.port < 65536:
        raise FedpeftError(f"--port must be between 1 and 65535, got {a.port}")
    result = run_server(cfg, Path(a.out), opts, resume=a.resume, resume_from=a.resume_from)
    print(
        summary(result.rounds, result.history, method_label(cfg.personal))
        + f"\nserver folder {a.out} (metrics.jsonl, plot.png, global/)"
    )


def cmd_client(a: argparse.Namespace) -> None:
    from fedpeft.deploy.client import ClientOptions, run_client

    if a.threads is not None and a.threads < 1:
        raise FedpeftError(f"--threads must be at least 1, got {a.threads}")
    code = run_client(
        ClientOptions(
            server=a.server,
            data=Path(a.data),
            store=Path(a.store),
            root_cert=Path(a.root_cert) if a.root_cert else None,
            key=Path(a.key) if a.key else None,
            name=a.name,
            model=a.model,
            insecure=a.insecure,
            max_wait=a.max_wait,
            threads=a.threads,
            require_secagg=a.require_secagg,
            min_neighbours=a.min_neighbours,
            min_local_noise=a.dp_min_local_noise,
            max_memory=a.max_memory,
            compute_dtype=field_value(a, "base.compute_dtype") or "",
        )
    )
    if code not in (0, 130, -15):
        raise FedpeftError(f"the SuperNode exited with code {code} (see the log above)")


def cmd_deploy_local(a: argparse.Namespace) -> None:
    from fedpeft.deploy.local import deploy_local

    if print_config(a, "deploy-local"):
        return
    require_out(a)
    cfg = config_from_args(a, "deploy-local")
    code = deploy_local(cfg, Path(a.out), port=a.port, resume=a.resume, resume_from=a.resume_from)
    if code != 0:
        raise FedpeftError(f"the server failed (exit code {code}); see {Path(a.out) / 'server.log'}")


COMMANDS = {"certs": cmd_certs, "server": cmd_server, "client": cmd_client, "deploy-local": cmd_deploy_local}
