"""`fedpeft client`: a Flower SuperNode on an edge device, with the owner's own text as private data.

The device needs no Ray and no GPU. What it keeps in its store (`--store`):
  base/              the base model converted once from its packaged or given file (quantized at load)
  node-config.toml   what our ClientApp reads: data path, user name, base location
  personal/<user>/   the personal adapter, the last global adapter and choice.json, when the federation
                     personalizes (--personalize); never sent anywhere
  supernode.log      (when started by `fedpeft deploy-local`)
Flower's SuperNode runs each message in a fresh ClientApp process; that process loads the base from
the store (about a second for the default model, see README) and exits, so between rounds the device
holds only the SuperNode itself.
"""

from __future__ import annotations

import logging
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from fedpeft.checkpoint import atomic_write_bytes
from fedpeft.deploy.processes import executable, flower_env, free_port, stop_tree
from fedpeft.errors import FedpeftError
from fedpeft.secagg.protocol import MIN_NEIGHBOURS

log = logging.getLogger("fedpeft")


@dataclass(frozen=True)
class ClientOptions:
    server: str  # HOST:PORT of the SuperLink
    data: Path  # the owner's text: a .txt file or a folder of them
    store: Path
    root_cert: Path | None = None  # CA certificate that signed the server's (from `fedpeft certs`)
    key: Path | None = None  # this device's node-authentication private key
    name: str = ""  # user name reported to the server (default: the data file or folder name)
    model: str = "default"  # default | tiny | PATH: this device's copy of the base
    insecure: bool = False
    max_wait: float | None = None  # give up reconnecting after this many seconds (default: never)
    threads: int | None = None  # CPU threads for training (default: all cores)
    # The device's own security policy (never lowered by the server): send updates only masked, and
    # mask them with at least this many neighbours.
    require_secagg: bool = False
    min_neighbours: int = MIN_NEIGHBOURS


def _check_server(address: str) -> None:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise FedpeftError(f"--server must be HOST:PORT, got {address!r}")


def _check_key(path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    try:
        key = load_ssh_private_key(path.read_bytes(), password=None)
    except OSError as e:
        raise FedpeftError(f"cannot read --key {path}: {e.strerror}") from None
    except ValueError:
        raise FedpeftError(
            f"--key {path} is not an OpenSSH private key (use clients/NAME.key from `fedpeft certs`)"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise FedpeftError(f"--key {path} is not an ECDSA key")


def _resolve_base(model: str, cache: Path) -> Path:
    """Convert or build the base into the store, in a child process: this process then runs for days
    beside the SuperNode and should not hold torch and transformers in a small device's memory."""
    import sys

    code = "import sys; from fedpeft.cli import resolve_base_main; sys.exit(resolve_base_main(sys.argv[1:]))"
    done = subprocess.run([sys.executable, "-c", code, model, str(cache)], capture_output=True, text=True)
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.startswith("fedpeft: error: ")]
        raise FedpeftError(
            lines[-1].removeprefix("fedpeft: error: ") if lines else done.stderr.strip()[-300:]
        )
    return Path(done.stdout.strip().splitlines()[-1])


def prepare(opts: ClientOptions) -> tuple[Path, list[str]]:
    """Check every input, convert the base into the store once, write the node config. Returns the node
    config file and the flower-supernode command line."""
    import tomli_w

    from fedpeft.data import load_device_user
    from fedpeft.node_config import DeviceNode

    _check_server(opts.server)
    if opts.min_neighbours < 1:
        raise FedpeftError(
            f"--min-neighbours must be at least 1, got {opts.min_neighbours}: with no neighbour the server "
            "alone could remove the only mask left on the update"
        )
    if opts.min_neighbours == 1:
        log.warning(
            "--min-neighbours 1: the server and one colluding client could unmask this device's update"
        )
    if opts.insecure:
        log.warning("--insecure: traffic to and from the server is NOT encrypted")
    elif opts.root_cert is None or not opts.root_cert.is_file():
        raise FedpeftError(
            "TLS needs --root-cert (the ca.pem from `fedpeft certs`)"
            if opts.root_cert is None
            else f"--root-cert {opts.root_cert} does not exist"
        )
    if opts.key is not None:
        _check_key(opts.key)
    user = load_device_user(str(opts.data), opts.name)  # one-line error if there is no text
    store = opts.store.resolve()
    store.mkdir(parents=True, exist_ok=True)
    base_dir = _resolve_base(opts.model, store / "base")
    node = DeviceNode(
        data_path=str(opts.data.resolve()),
        name=user.user,
        model=str(base_dir),
        cache_dir=str(store / "base"),
        store=str(store),
        personal_dir=str(store / "personal"),
        require_secagg=opts.require_secagg,
        min_neighbours=opts.min_neighbours,
    )
    node_file = store / "node-config.toml"
    atomic_write_bytes(node_file, tomli_w.dumps(node.to_node_config()).encode())
    args = [
        executable("flower-supernode"),
        "--superlink",
        opts.server,
        "--node-config",
        str(node_file),
        # the SuperNode's own local API for its ClientApp processes: a free port, so several clients
        # can share a machine
        "--port",
        str(free_port()),
    ]
    if opts.insecure:
        args.append("--insecure")
    else:
        assert opts.root_cert is not None
        args += ["--root-certificates", str(opts.root_cert.resolve())]
    if opts.key is not None:
        args += ["--auth-supernode-private-key", str(opts.key.resolve())]
    if opts.max_wait is not None:
        args += ["--max-wait-time", str(opts.max_wait)]
    log.info("user %r, %d characters of text; base %s", user.user, len(user.text), base_dir)
    return node_file, args


def run_client(opts: ClientOptions) -> int:
    """Run the SuperNode in the foreground until the user interrupts; returns its exit code.

    Flower's SuperNode retries a lost connection itself, but exits when its first activation fails (the
    server is not up yet, or has not registered this key yet); we start it again with a growing pause,
    so a device may come up before its server and rides out server restarts."""
    _, args = prepare(opts)
    extra = {}
    if opts.threads:  # read by torch in every ClientApp process the SuperNode starts
        extra = {"OMP_NUM_THREADS": str(opts.threads), "MKL_NUM_THREADS": str(opts.threads)}
    env = flower_env(opts.store.resolve() / "flwr", extra)
    log.info("connecting to %s (reconnects on its own if the server goes away)", opts.server)
    start, pause = time.monotonic(), 2.0
    while True:
        proc = subprocess.Popen(args, env=env, start_new_session=True)
        try:
            code = proc.wait()
        except KeyboardInterrupt:
            return 130
        finally:
            stop_tree(proc.pid)
        if code == 0:
            return 0
        if opts.max_wait is not None and time.monotonic() - start + pause > opts.max_wait:
            log.error("gave up after --max-wait %.0f s", opts.max_wait)
            return code
        log.warning(
            "the server at %s did not accept this device (not reachable, or this key is not registered "
            "there); trying again in %.0f s",
            opts.server,
            pause,
        )
        try:
            time.sleep(pause)
        except KeyboardInterrupt:
            return 130
        pause = min(pause * 2, 30.0)
