"""The local config tree: the options of commands that never travel. They are declared like the run config's
(`option(...)`: flag, help, type, range, once) and their flags are generated the same way
(fedpeft.config.flags), but LocalConfig is a root of its own: its fields are not in fedpeft.config.tree's
fields(), so they never enter Flower's run config, a config file or `[tool.flwr.app.config]`, and no server
can set them. A device's own options (node-config.toml) are the `device` section (fedpeft.config.node)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

from fedpeft.config.fields import REQUIRED, Field, leaves, option, section
from fedpeft.config.node import DeviceConfig

API_KEY_ENV = "FEDPEFT_API_KEY"  # `fedpeft serve`'s key when --api-key is not given
NETWORK, BATCHING = "network", "batching"


@dataclass(frozen=True)
class ConnectConfig:
    """How `fedpeft client` reaches its server (not written to the node config)."""

    server: str = option(REQUIRED, "the server's address", flag="--server", metavar="HOST:PORT")
    root_cert: str | None = option(
        None, "ca.pem from `fedpeft certs` (TLS)", flag="--root-cert", metavar="PEM"
    )
    key: str | None = option(
        None, "this device's private key, clients/NAME.key (auth)", flag="--key", metavar="KEY"
    )
    insecure: bool = option(
        False, "no TLS (only against a server started with --insecure)", flag="--insecure"
    )
    threads: int | None = option(
        None,
        "CPU threads for training (default: all cores; set it when devices share a machine)",
        flag="--threads",
        metavar="N",
        ge=1,
    )
    max_wait: float | None = option(
        None,
        "give up after S seconds without the server (default: keep trying)",
        flag="--max-wait",
        metavar="S",
    )


@dataclass(frozen=True)
class NetworkConfig:
    """Where `fedpeft server` listens and whom it lets in."""

    host: str = option(
        "127.0.0.1", "address to listen on; 0.0.0.0 for clients on other machines", flag="--host"
    )
    port: int = option(
        9092,
        "port to listen on",
        flag="--port",
        ge=1,
        le=65535,
        commands=("server", "deploy-local"),
        unset={"deploy-local": "a free one"},
    )
    certs: str | None = option(
        None, "folder from `fedpeft certs` (ca.pem, server.pem, server.key)", flag="--certs", metavar="DIR"
    )
    insecure: bool = option(False, "no TLS: traffic in clear text (for local trials only)", flag="--insecure")
    auth: bool = option(
        True,
        "node authentication: only registered client keys may join (--no-auth: let any client join)",
        flag="--auth",
    )
    client_keys: tuple[str, ...] = option(
        (),
        "client public keys to register (default: clients/*.pub in --certs)",
        flag="--client-keys",
        metavar="PUB",
        many="+",
    )


@dataclass(frozen=True)
class CertsConfig:
    out: str = option("certs", "certificate folder", flag="--out", metavar="DIR")
    san: tuple[str, ...] = option(
        (),
        "an IP address or host name clients use to reach the server; repeat for several (default: "
        "127.0.0.1 and localhost)",
        flag="--san",
        metavar="NAME",
        many="append",
    )
    clients: str = option(
        "3",
        "client key pairs to make: a count (client-1..client-N) or names",
        flag="--clients",
        metavar="N|NAME,NAME",
    )


@dataclass(frozen=True)
class ServeConfig:
    """`fedpeft serve`: what it serves, where, and how it batches."""

    adapter: tuple[str, ...] = option(
        (),
        "serve the adapter folder PATH as model NAME; repeat for several",
        flag="--adapter",
        metavar="NAME=PATH",
        many="append",
    )
    host: str = option(
        "127.0.0.1",
        "address to listen on; any other than this machine's loopback needs an API key",
        flag="--host",
        group=NETWORK,
    )
    port: int = option(8000, "port; 0 picks a free one", flag="--port", group=NETWORK)
    api_key: str | None = option(
        None,
        f"require Authorization: Bearer KEY on /v1/ (default: ${API_KEY_ENV}, else none on loopback)",
        flag="--api-key",
        metavar="KEY",
        group=NETWORK,
    )
    ssl_certfile: str | None = option(
        None, "serve HTTPS with this certificate", flag="--ssl-certfile", metavar="PEM", group=NETWORK
    )
    ssl_keyfile: str | None = option(
        None, "the certificate's private key", flag="--ssl-keyfile", metavar="PEM", group=NETWORK
    )
    max_batch: int = option(16, "requests decoded together", flag="--max-batch", metavar="N", group=BATCHING)
    batch_wait_ms: float = option(
        50.0,
        "how long an idle server waits for more requests to batch with the first; next to a decode of a "
        "second or more on a CPU it is cheap, and it lets clients that start a little apart share a batch",
        flag="--batch-wait-ms",
        metavar="MS",
        group=BATCHING,
    )
    max_queue: int = option(
        256,
        "prompts that may wait for a batch; more are answered 503, busy",
        flag="--max-queue",
        metavar="N",
        group=BATCHING,
    )
    max_tokens: int = option(
        512, "the most tokens one request may generate", flag="--max-tokens", metavar="N", group=BATCHING
    )


@dataclass(frozen=True)
class ExportConfig:
    out: str = option(REQUIRED, "folder to write (replaced only on success)", flag="--out", metavar="DIR")
    user: str | None = option(
        None,
        "export this user's adapter from the personal store under ADAPTER_DIR: the one the device kept "
        "(personal or global), or --which",
        flag="--user",
        metavar="NAME",
    )
    which: Literal["kept", "personal", "global"] = option(
        "kept", "with --user: which of the user's adapters", flag="--which"
    )
    merge: bool = option(
        False,
        "write a merged, dequantized Hugging Face model folder instead of the adapter",
        flag="--merge",
    )
    merge_onto: Literal["full", "quantized"] = option(
        "full",
        "with --merge: the base the adapter is merged onto: full, the unquantized weights (QLoRA's "
        "practice), or quantized, the weights the devices ran it on, dequantized",
        flag="--merge-onto",
    )
    dtype: Literal["float32", "bfloat16"] = option(
        "float32",
        "weights dtype of a merged model (bf16 rounds away small adapter deltas)",
        flag="--dtype",
    )


@dataclass(frozen=True)
class GenerateConfig:
    user: str = option(REQUIRED, "whose personal adapter", flag="--user", metavar="NAME")
    prompt: str = option(REQUIRED, "text to continue", flag="--prompt")
    max_new_tokens: int = option(40, "tokens to generate", flag="--max-new-tokens", metavar="N")


@dataclass(frozen=True)
class EvalConfig:
    examples: Literal["held-out", "all"] = option(
        "held-out",
        "each user's held-out tail, as a federation holds it out, or all of its examples (new users, "
        "new data)",
        flag="--examples",
    )
    users: str = option("", "only these users (default: all)", flag="--users", metavar="A,B,...")
    json: str | None = option(
        None, "also write every figure, per user, to FILE", flag="--json", metavar="FILE"
    )


@dataclass(frozen=True)
class LocalConfig:
    """The sections, each with the commands that offer its flags. Never built: a command builds the
    sections it takes (fedpeft.config.flags.local_section)."""

    device: DeviceConfig = section(DeviceConfig, ("client",))
    connect: ConnectConfig = section(ConnectConfig, ("client",))
    network: NetworkConfig = section(NetworkConfig, ("server",))
    certs: CertsConfig = section(CertsConfig, ("certs",))
    serve: ServeConfig = section(ServeConfig, ("serve",))
    export: ExportConfig = section(ExportConfig, ("export",))
    generate: GenerateConfig = section(GenerateConfig, ("generate",))
    eval: EvalConfig = section(EvalConfig, ("eval",))


@functools.cache
def local_fields() -> tuple[Field, ...]:
    """Every leaf of LocalConfig, in declaration order."""
    return tuple(leaves(LocalConfig))
