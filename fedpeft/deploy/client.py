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

import dataclasses
import logging
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import tomli_w
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key

from fedpeft.atomic import atomic_write_bytes
from fedpeft.config.local import ConnectConfig
from fedpeft.config.node import DeviceConfig
from fedpeft.config.tree import BaseConfig
from fedpeft.data.users import load_device_user
from fedpeft.device.link import LOADS_FILE, socket_path
from fedpeft.errors import FedpeftError
from fedpeft.processes import executable, flower_env, free_port, stop_tree

# Flower's SuperExec looks for a task to launch every second by default; this is its supported setting
# (flwr/supercore/superexec/run_superexec.py). The SuperNode's own 3 s poll of the SuperLink has none.
TASK_POLL_SECONDS = 0.1

log = logging.getLogger("fedpeft")


@dataclass(frozen=True)
class ClientOptions:
    """`fedpeft client`'s options, as the config tree declares them (fedpeft.config.local)."""

    connect: ConnectConfig  # how to reach the server; not written anywhere
    device: DeviceConfig  # the device's own options and policy, as given: prepare() resolves its paths
    model: str = "default"  # default | tiny | PATH: this device's copy of the base (the tree's --model)


def _check_server(address: str) -> None:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise FedpeftError(f"--server must be HOST:PORT, got {address!r}")


def _check_key(path: Path) -> None:
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
    code = "import sys; from fedpeft.cli import resolve_base_main; sys.exit(resolve_base_main(sys.argv[1:]))"
    done = subprocess.run([sys.executable, "-c", code, model, str(cache)], capture_output=True, text=True)
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.startswith("fedpeft: error: ")]
        raise FedpeftError(
            lines[-1].removeprefix("fedpeft: error: ") if lines else done.stderr.strip()[-300:]
        )
    return Path(done.stdout.strip().splitlines()[-1])


def _check(connect: ConnectConfig, device: DeviceConfig) -> None:
    """Every input that can be checked before anything is written or converted."""
    _check_server(connect.server)
    if device.min_neighbours < 1:
        raise FedpeftError(
            f"--min-neighbours must be at least 1, got {device.min_neighbours}: with no neighbour the server "
            "alone could remove the only mask left on the update"
        )
    if device.min_neighbours == 1:
        log.warning(
            "--min-neighbours 1: the server and one colluding client could unmask this device's update"
        )
    if connect.insecure:
        log.warning("--insecure: traffic to and from the server is NOT encrypted")
    elif connect.root_cert is None or not Path(connect.root_cert).is_file():
        raise FedpeftError(
            "TLS needs --root-cert (the ca.pem from `fedpeft certs`)"
            if connect.root_cert is None
            else f"--root-cert {connect.root_cert} does not exist"
        )
    if connect.key is not None:
        _check_key(Path(connect.key))
    if not device.min_local_noise >= 0 or device.min_local_noise == float("inf"):
        raise FedpeftError(f"--dp-min-local-noise must be a number at least 0, got {device.min_local_noise}")


def _supernode_args(connect: ConnectConfig, node_file: Path) -> list[str]:
    args = [
        executable("flower-supernode"),
        "--superlink",
        connect.server,
        "--node-config",
        str(node_file),
        # the SuperNode's own local API for its ClientApp processes: a free port, so several clients
        # can share a machine
        "--port",
        str(free_port()),
    ]
    if connect.insecure:
        args.append("--insecure")
    else:
        assert connect.root_cert is not None
        args += ["--root-certificates", str(Path(connect.root_cert).resolve())]
    if connect.key is not None:
        args += ["--auth-supernode-private-key", str(Path(connect.key).resolve())]
    if connect.max_wait is not None:
        args += ["--max-wait-time", str(connect.max_wait)]
    return args


def prepare(opts: ClientOptions) -> tuple[Path, list[str]]:
    """Check every input, convert the base into the store once, write the node config. Returns the node
    config file and the flower-supernode command line."""
    _check(opts.connect, opts.device)
    # one-line error if there is no data; records are read here and interpreted with the federation's
    # options (columns, label set) by the worker, which has them
    user = load_device_user(str(Path(opts.device.data_path)), opts.device.name, interpret=False)
    store = Path(opts.device.store).resolve()
    store.mkdir(parents=True, exist_ok=True)
    store.chmod(0o700)  # the worker's socket lives here: only the device's owner may reach it
    base_dir = _resolve_base(opts.model, store / "base")
    node = dataclasses.replace(
        opts.device,
        data_path=str(Path(opts.device.data_path).resolve()),
        name=user.user,
        model=str(base_dir),
        cache_dir=str(store / "base"),
        store=str(store),
        personal_dir=str(store / "personal"),
        worker=str(socket_path(store)),
    )
    node_file = store / "node-config.toml"
    atomic_write_bytes(node_file, tomli_w.dumps(node.to_node_config()).encode())
    what = f"{len(user.examples)} records" if user.examples else f"{len(user.text)} characters of text"
    log.info("user %r, %s; base %s", user.user, what, base_dir)
    _precision_note(base_dir, store / "base", opts.connect.threads, opts.device.compute_dtype)
    return node_file, _supernode_args(opts.connect, node_file)


def _precision_note(base_dir: Path, cache_dir: Path, threads: int | None, compute_dtype: str) -> None:
    """What this device will compute in: its own --compute-dtype, or where the federation's is auto, what
    the device chooses for itself (fedpeft.model.precision); its worker reads the same cached measurement."""
    from fedpeft.model.base import preview_precision  # torch: only to preview the precision here

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
        self.started = time.monotonic()
        return subprocess.Popen(
            [sys.executable, "-m", "fedpeft.device.worker", str(self.store)], env=self.env
        )

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
    connect = opts.connect
    extra = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": str(TASK_POLL_SECONDS)}
    if connect.threads:  # read by torch in the worker
        extra |= {"OMP_NUM_THREADS": str(connect.threads), "MKL_NUM_THREADS": str(connect.threads)}
    store = Path(opts.device.store).resolve()
    env = flower_env(store / "flwr", extra)
    worker = Worker(store, env)
    log.info("connecting to %s (reconnects on its own if the server goes away)", connect.server)
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
            if connect.max_wait is not None and time.monotonic() - start + pause > connect.max_wait:
                log.error("gave up after --max-wait %.0f s", connect.max_wait)
                return code
            log.warning(
                "the server at %s did not accept this device (not reachable, or this key is not registered "
                "there); trying again in %.0f s",
                connect.server,
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
