"""`fedpeft serve`: flags -> catalog, base, engine, batcher, API, uvicorn."""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedpeft.config.flags import add_config_flags, config_from_args, field_value, local_section
from fedpeft.config.local import API_KEY_ENV, ServeConfig
from fedpeft.config.tree import BaseConfig
from fedpeft.errors import FedpeftError

if TYPE_CHECKING:
    from fedpeft.model.base import Base
    from fedpeft.serve.catalog import Entry


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
    add_config_flags(p, "serve")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_network(o: ServeConfig) -> str | None:
    """The API key to require; refuses an exposed server without one before anything loads."""
    key = o.api_key if o.api_key is not None else os.environ.get(API_KEY_ENV)
    if key is not None and len(key) < 8:
        raise FedpeftError("--api-key is shorter than 8 characters")
    if not _loopback(o.host) and not key:
        raise FedpeftError(
            f"--host {o.host} lets other machines reach the server: set --api-key KEY (or ${API_KEY_ENV})"
        )
    if (o.ssl_certfile is None) != (o.ssl_keyfile is None):
        raise FedpeftError("--ssl-certfile and --ssl-keyfile go together")
    for f in (o.ssl_certfile, o.ssl_keyfile):
        if f is not None and not Path(f).is_file():
            raise FedpeftError(f"no such file: {f}")
    if min(o.max_batch, o.max_tokens, o.max_queue) < 1 or o.batch_wait_ms < 0:
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


def _load(a: argparse.Namespace, meta: dict[str, Any]) -> Base:
    """The base every served adapter was trained on, where --model says it is now."""
    # torch: the command loads the base; its flags and one-line refusals come first
    from fedpeft.model.adapters import base_model
    from fedpeft.model.base import load_base

    chosen = config_from_args(a, "serve").base  # --device, --compute-dtype
    return load_base(
        BaseConfig(
            model=field_value(a, "base.model") or base_model(meta),
            quant=meta["quant"],
            cache_dir=field_value(a, "base.cache_dir"),
            device=chosen.device,
            compute_dtype=chosen.compute_dtype,
        )
    )


def _banner(o: ServeConfig, entries: list[Entry], base: Base, url: str, key: str | None) -> str:
    lines = [f"  {e.name:<24} {e.kind}, round {e.round}: {e.origin}" for e in entries]
    meta = entries[0].files.meta
    shown = meta.get("base", {}).get("id") or meta["base_path"]  # the public id when the base has one
    exposed = "" if _loopback(o.host) else "; reachable from other machines"
    clear = "; plain HTTP: the key travels in clear" if key and url.startswith("http:") and exposed else ""
    lines.append(
        f"serving base + {len(entries)} adapter(s) on {shown} ({base.quant}, {base.device}, "
        f"{base.precision.line()}) at {url}{'; API key required' if key else ''}{exposed}{clear}"
    )
    return "\n".join(lines)


def cmd_serve(a: argparse.Namespace) -> None:
    try:  # fastapi, uvicorn: the serve extra, and only this command's
        import uvicorn

        from fedpeft.serve.api import create_app
    except ImportError as e:
        raise FedpeftError(f"fedpeft serve needs the serve extra (pip install -e '.[serve]'): {e}") from None
    # torch, transformers: this command's, off the CLI's start-up path
    from fedpeft.serve.batcher import Batcher
    from fedpeft.serve.catalog import base_entry, discover
    from fedpeft.serve.engine import Engine

    o = local_section(a, "serve", "serve")
    key = _check_network(o)
    entries = discover(a.sources, list(o.adapter))
    sock = _bind(o.host, o.port)  # before the base loads: a taken port is a one-line error, not a wait
    base = _load(a, base_entry(entries).files.meta)
    engine = Engine(base, entries)
    batcher = Batcher(engine, o.max_batch, o.batch_wait_ms / 1000, o.max_queue)
    app = create_app(engine, batcher, key, o.max_tokens)
    host, port = sock.getsockname()[:2]
    scheme = "https" if o.ssl_certfile else "http"
    print(
        _banner(o, entries, base, f"{scheme}://{'[' + host + ']' if ':' in host else host}:{port}/v1", key),
        flush=True,
    )
    batcher.start()
    config = uvicorn.Config(
        app,
        log_level="warning",
        ssl_certfile=o.ssl_certfile,
        ssl_keyfile=o.ssl_keyfile,
        timeout_graceful_shutdown=10,
    )
    try:  # uvicorn stops gracefully on SIGINT/SIGTERM, then re-raises the signal
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        batcher.stop()
        sock.close()
    print(
        f"fedpeft serve: stopped after {batcher.rows} request(s) in {batcher.batches} batch(es)",
        file=sys.stderr,
    )
