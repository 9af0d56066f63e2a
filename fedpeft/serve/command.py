"""`fedpeft serve`: flags -> catalog, base, engine, batcher, API, uvicorn."""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys
from pathlib import Path

from fedpeft.config.flags import add_base_location, add_config_flags, config_from_args
from fedpeft.errors import FedpeftError

API_KEY_ENV = "FEDPEFT_API_KEY"


def add_serve_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve the base, global and personal adapters over an OpenAI-compatible HTTP API",
        description="Load the base once with every adapter of the given run folders, device stores and "
        "--adapter folders, and answer GET /v1/models, POST /v1/completions and /v1/chat/completions (OpenAI's "
        "API; stream: true as server-sent events). The request's model picks the adapter: base, global, "
        "personal/<user> or a --adapter NAME. Requests that arrive together are decoded in one batch, LoRA "
        "adapters mixed in one forward. Needs the serve extra: pip install -e '.[serve]'.",
    )
    p.add_argument(
        "sources", nargs="*", metavar="RUN_OR_STORE", help="run folders or device stores (--store)"
    )
    p.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="serve the adapter folder PATH as model NAME; repeat for several",
    )
    n = p.add_argument_group("network")
    n.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on; any other than this machine's loopback needs an API key (default: %(default)s)",
    )
    n.add_argument("--port", type=int, default=8000, help="port; 0 picks a free one (default: %(default)s)")
    n.add_argument(
        "--api-key",
        default=None,
        metavar="KEY",
        help=f"require Authorization: Bearer KEY on /v1/ (default: ${API_KEY_ENV}, else none on loopback)",
    )
    n.add_argument("--ssl-certfile", default=None, metavar="PEM", help="serve HTTPS with this certificate")
    n.add_argument("--ssl-keyfile", default=None, metavar="PEM", help="the certificate's private key")
    b = p.add_argument_group("batching")
    b.add_argument(
        "--max-batch",
        type=int,
        default=16,
        metavar="N",
        help="requests decoded together (default: %(default)s)",
    )
    b.add_argument(
        "--batch-wait-ms",
        type=float,
        default=50.0,
        metavar="MS",
        help="how long an idle server waits for more requests to batch with the first; next to a decode of a "
        "second or more on a CPU it is cheap, and it lets clients that start a little apart share a batch "
        "(default: %(default)s)",
    )
    b.add_argument(
        "--max-queue",
        type=int,
        default=256,
        metavar="N",
        help="prompts that may wait for a batch; more are answered 503, busy (default: %(default)s)",
    )
    b.add_argument(
        "--max-tokens",
        type=int,
        default=512,
        metavar="N",
        help="the most tokens one request may generate (default: %(default)s)",
    )
    add_base_location(add_config_flags(p, "serve")["base"])


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_network(a: argparse.Namespace) -> str | None:
    """The API key to require; refuses an exposed server without one before anything loads."""
    key = a.api_key if a.api_key is not None else os.environ.get(API_KEY_ENV)
    if key is not None and len(key) < 8:
        raise FedpeftError("--api-key is shorter than 8 characters")
    if not _loopback(a.host) and not key:
        raise FedpeftError(
            f"--host {a.host} lets other machines reach the server: set --api-key KEY (or ${API_KEY_ENV})"
        )
    if (a.ssl_certfile is None) != (a.ssl_keyfile is None):
        raise FedpeftError("--ssl-certfile and --ssl-keyfile go together")
    for f in (a.ssl_certfile, a.ssl_keyfile):
        if f is not None and not Path(f).is_file():
            raise FedpeftError(f"no such file: {f}")
    if min(a.max_batch, a.max_tokens, a.max_queue) < 1 or a.batch_wait_ms < 0:
        raise FedpeftError(
            "--max-batch, --max-queue and --max-tokens must be positive, --batch-wait-ms not negative"
        )
    return key or None


def _bind(host: str, port: int) -> socket.socket:
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        return socket.create_server((host, port), family=family, reuse_port=False)
    except OSError as e:
        raise FedpeftError(f"cannot listen on {host}:{port}: {e.strerror}") from None


def cmd_serve(a: argparse.Namespace) -> None:
    try:
        import uvicorn

        from fedpeft.serve.api import create_app
    except ImportError as e:
        raise FedpeftError(f"fedpeft serve needs the serve extra (pip install -e '.[serve]'): {e}") from None
    from fedpeft.config.tree import BaseConfig
    from fedpeft.model.adapters import base_model
    from fedpeft.model.base import load_base
    from fedpeft.serve.batcher import Batcher
    from fedpeft.serve.catalog import discover
    from fedpeft.serve.engine import Engine

    key = _check_network(a)
    entries = discover(a.sources, a.adapter)
    sock = _bind(a.host, a.port)  # before the base loads: a taken port is a one-line error, not a wait
    meta = entries[0].files.meta
    shown = meta.get("base", {}).get("id") or meta["base_path"]  # the public id when the base has one
    chosen = config_from_args(a, "serve").base
    base = load_base(
        BaseConfig(
            model=a.model or base_model(meta),
            quant=meta["quant"],
            cache_dir=a.cache_dir,
            device=chosen.device,
            compute_dtype=chosen.compute_dtype,
        )
    )
    engine = Engine(base, entries)
    batcher = Batcher(engine, a.max_batch, a.batch_wait_ms / 1000, a.max_queue)
    app = create_app(engine, batcher, key, a.max_tokens)
    host, port = sock.getsockname()[:2]
    scheme = "https" if a.ssl_certfile else "http"
    url = f"{scheme}://{'[' + host + ']' if ':' in host else host}:{port}/v1"
    for e in entries:
        print(f"  {e.name:<24} {e.kind}, round {e.round}: {e.origin}")
    exposed = "" if _loopback(a.host) else "; reachable from other machines"
    print(
        f"serving base + {len(entries)} adapter(s) on {shown} ({base.quant}, {base.device}, {base.precision.line()}) at {url}"
        f"{'; API key required' if key else ''}{exposed}{'; plain HTTP: the key travels in clear' if key and scheme == 'http' and exposed else ''}",
        flush=True,
    )
    batcher.start()
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            log_level="warning",
            ssl_certfile=a.ssl_certfile,
            ssl_keyfile=a.ssl_keyfile,
            timeout_graceful_shutdown=10,
        )
    )
    try:
        server.run(sockets=[sock])  # uvicorn stops gracefully on SIGINT/SIGTERM, then re-raises the signal
    except KeyboardInterrupt:
        pass
    finally:
        batcher.stop()
        sock.close()
    print(
        f"fedpeft serve: stopped after {batcher.rows} request(s) in {batcher.batches} batch(es)",
        file=sys.stderr,
    )
