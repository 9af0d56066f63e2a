"""`fedpeft client`: a Flower SuperNode on an edge device, with the owner's own text as private data.

The device needs no Ray and no GPU. What it keeps in its store (`--store`, mode 0700):
  base/              the base model converted once from its packaged or given file (kept quantized too)
  node-config.toml   what our ClientApp reads: data path, user name, base location, worker socket, policy
  worker.sock        the resident worker's socket (0600)
  base-loads         one line per base load since this client started (reported as `base_loads`)
  personal/<user>/   the personal adapter, the last global adapter and choice.json, when the federation
                     personalizes (--personalize); never sent anywhere
Two processes of ours run on the device: this one, which supervises the SuperNode and the resident worker
(fedpeft.device.worker: the base, the tokenized text and the personal store, loaded once), restarting either
when it dies and stopping both on exit; and the worker. Flower's SuperNode starts a fresh ClientApp
process per message; ours imports no torch and forwards the task to the worker.
"""

from __future__ import annotations

import logging
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from fedpeft.atomic import atomic_write_bytes
from fedpeft.deploy.processes import executable, flower_env, free_port, stop_tree
from fedpeft.device.link import socket_path
from fedpeft.device.worker import LOADS_FILE
from fedpeft.errors import FedpeftError
from fedpeft.secagg.protocol import MIN_NEIGHBOURS

# Flower's SuperExec looks for a task to launch every second by default; this is its supported setting
# (flwr/supercore/superexec/run_superexec.py). The SuperNode's own 3 s poll of the SuperLink has none.
TASK_POLL_SECONDS = 0.1

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
    min_local_noise: float = 0.0  # distributed DP: the least noise this device adds, over its sensitivity
    max_memory: int = 0  # MiB for the training process (0: no limit); micro-batches that fit it
    compute_dtype: str = ""  # "": as the federation says (its `auto` resolved here)


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

    from fedpeft.config.node import DeviceNode
    from fedpeft.data.users import load_device_user

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
    if not opts.min_local_noise >= 0 or opts.min_local_noise == float("inf"):
        raise FedpeftError(f"--dp-min-local-noise must be a number at least 0, got {opts.min_local_noise}")
    if opts.max_memory < 0:
        raise FedpeftError(f"--max-memory must be at least 0 MiB, got {opts.max_memory}")
    # one-line error if there is no data; records are read here and interpreted with the federation's
    # options (columns, label set) by the worker, which has them
    user = load_device_user(str(opts.data), opts.name, interpret=False)
    store = opts.store.resolve()
    store.mkdir(parents=True, exist_ok=True)
    store.chmod(0o700)  # the worker's socket lives here: only the device's owner may reach it
    sock = socket_path(store)
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
        min_local_noise=float(opts.min_local_noise),
        worker=str(sock),
        max_memory=opts.max_memory,
        compute_dtype=opts.compute_dtype,
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
    what = f"{len(user.examples)} records" if user.examples else f"{len(user.text)} characters of text"
    log.info("user %r, %s; base %s", user.user, what, base_dir)
    _precision_note(base_dir, store / "base", opts.threads, opts.compute_dtype)
    return node_file, args


def _precision_note(base_dir: Path, cache_dir: Path, threads: int | None, compute_dtype: str) -> None:
    """What this device will compute in: its own --compute-dtype, or where the federation's is auto, what
    the device chooses for itself (fedpeft.model.precision); its worker reads the same cached measurement."""
    from fedpeft.config.tree import BaseConfig
    from fedpeft.model.base import preview_precision

    cfg = BaseConfig(model=str(base_dir), cache_dir=str(cache_dir), compute_dtype=compute_dtype or "auto")
    precision = preview_precision(cfg, threads)
    where = "" if compute_dtype else " (where the federation's --compute-dtype is auto)"
    log.info("this device is %s%s", precision.line(), where)


class Worker:
    """The resident worker (fedpeft.device.worker), restarted when it dies. Crashes in a row that each come
    within a minute of their start mean it cannot run (say, the store is broken): then give up."""

    MAX_QUICK_CRASHES = 5

    def __init__(self, store: Path, env: dict[str, str]) -> None:
        self.store, self.env = store, env
        self.quick_crashes = 0
        (store / LOADS_FILE).unlink(missing_ok=True)  # base_loads counts from this client's start
        self.proc = self._start()

    def _start(self) -> subprocess.Popen:
        import sys

        self.started = time.monotonic()
        return subprocess.Popen([sys.executable, "-m", "fedpeft.device.worker", str(self.store)], env=self.env)

    def check(self) -> None:
        """Restart the worker if it has exited; raise FedpeftError when it keeps dying at start."""
        code = self.proc.poll()
        if code is None:
            return
        quick = time.monotonic() - self.started < 60
        self.quick_crashes = self.quick_crashes + 1 if quick else 0
        if code == 2 or self.quick_crashes >= self.MAX_QUICK_CRASHES:  # 2: it refused its store or config
            raise FedpeftError(
                f"the device worker exited with code {code} and cannot be restarted; see its log above"
            )
        log.warning(
            "the device worker exited with code %s; restarting it (this round counts it as a dropout)", code
        )
        self.proc = self._start()  # it loads the base again, and base_loads counts that

    def stop(self) -> None:
        stop_tree(self.proc.pid, timeout=10.0)


def run_client(opts: ClientOptions) -> int:
    """Run the resident worker and the SuperNode until the user interrupts; returns the exit code.

    Flower's SuperNode retries a lost connection itself, but exits when its first activation fails (the
    server is not up yet, or has not registered this key yet); we start it again with a growing pause,
    so a device may come up before its server and rides out server restarts. The worker is restarted
    whenever it dies."""
    _, args = prepare(opts)
    extra = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": str(TASK_POLL_SECONDS)}
    if opts.threads:  # read by torch in the worker
        extra |= {"OMP_NUM_THREADS": str(opts.threads), "MKL_NUM_THREADS": str(opts.threads)}
    store = opts.store.resolve()
    env = flower_env(store / "flwr", extra)
    worker = Worker(store, env)
    log.info("connecting to %s (reconnects on its own if the server goes away)", opts.server)
    start, pause = time.monotonic(), 2.0
    try:
        while True:
            proc = subprocess.Popen(args, env=env, start_new_session=True)
            try:
                while (code := proc.poll()) is None:
                    worker.check()
                    time.sleep(0.5)
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
            deadline = time.monotonic() + pause
            while time.monotonic() < deadline:
                worker.check()
                time.sleep(0.5)
            pause = min(pause * 2, 30.0)
    except KeyboardInterrupt:
        return 130
    finally:
        worker.stop()
