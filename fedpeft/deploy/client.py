"""`fedpeft client`: a Flower SuperNode on an edge device, with the owner's own text as private data.

The device needs no Ray and no GPU. What it keeps in its store (`--store`, mode 0700):
  base/              the base model converted once from its packaged or given file (kept quantized too)
  node-config.toml   what our ClientApp reads: data path, user name, base location, policy
  superexec.secret   signs the worker's task claims on the SuperNode's Runtime API (0600, new each start)
  task-in-flight.json  the task the worker is running (its token), answered by a restarted worker
  base-loads         one line per base load since this client started (reported as `base_loads`)
  personal/<user>/   the personal adapter, the last global adapter and choice.json, when the federation
                     personalizes (--personalize); never sent anywhere
Three processes run on the device: this one, which supervises the other two, restarting either when it dies
and stopping both on exit; Flower's SuperNode (fedpeft.device.supernode: `flower-supernode` polling at the
protocol's rhythm) in `--isolation process` mode, so it starts no process of its own; and the resident worker
(fedpeft.device.worker: the base, the tokenized text and the personal store, loaded once), which claims the
SuperNode's tasks on its loopback Runtime API and runs our ClientApp for each.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
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
from fedpeft.data.users import load_device_user
from fedpeft.device.worker import IN_FLIGHT_FILE, LOADS_FILE, SECRET_FILE
from fedpeft.errors import FedpeftError
from fedpeft.processes import flower_env, free_port, stop_tree

RUNTIME_HOST = "127.0.0.1"  # the SuperNode's Runtime API, where the worker claims tasks: never off the device

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


def _resolve_base(model: str, cache: Path, compute_dtype: str, threads: int | None) -> tuple[Path, str]:
    """Convert or build the base into the store, in a child process: this process then runs for days
    beside the SuperNode and should not hold torch and transformers in a small device's memory. Returns
    the base's folder and what the device computes in (fedpeft.model.precision), previewed there too."""
    code = "import sys; from fedpeft.cli import resolve_base_main; sys.exit(resolve_base_main(sys.argv[1:]))"
    args = [sys.executable, "-c", code, model, str(cache), compute_dtype, str(threads or 0)]
    done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.startswith("fedpeft: error: ")]
        raise FedpeftError(
            lines[-1].removeprefix("fedpeft: error: ") if lines else done.stderr.strip()[-300:]
        )
    *_, precision, base = done.stdout.strip().splitlines()
    return Path(base), precision


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


def _supernode_args(connect: ConnectConfig, node_file: Path, port: int) -> list[str]:
    store = node_file.parent
    args = [
        sys.executable,
        "-m",
        "fedpeft.device.supernode",  # flower-supernode, polling at the protocol's rhythm
        "--superlink",
        connect.server,
        "--node-config",
        str(node_file),
        "--isolation",
        "process",  # it starts no SuperExec and no ClientApp process: the resident worker runs its tasks
        "--superexec-auth-secret-file",
        str(store / SECRET_FILE),
        # the Runtime API the worker claims tasks on: loopback, and a free port so several clients can
        # share a machine
        "--host",
        RUNTIME_HOST,
        "--port",
        str(port),
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


def prepare(opts: ClientOptions, port: int = 0) -> tuple[Path, list[str]]:
    """Check every input, convert the base into the store once, write the node config. Returns the node
    config file and the SuperNode's command line (its Runtime API on `port`, or a free one)."""
    _check(opts.connect, opts.device)
    # one-line error if there is no data; records are read here and interpreted with the federation's
    # options (columns, label set) by the worker, which has them
    user = load_device_user(str(Path(opts.device.data_path)), opts.device.name, interpret=False)
    store = Path(opts.device.store).resolve()
    store.mkdir(parents=True, exist_ok=True)
    store.chmod(0o700)  # the worker's secret and task record live here: the device's owner only
    base_dir, precision = _resolve_base(
        opts.model, store / "base", opts.device.compute_dtype, opts.connect.threads
    )
    node = dataclasses.replace(
        opts.device,
        data_path=str(Path(opts.device.data_path).resolve()),
        name=user.user,
        model=str(base_dir),
        cache_dir=str(store / "base"),
        store=str(store),
        personal_dir=str(store / "personal"),
    )
    node_file = store / "node-config.toml"
    atomic_write_bytes(node_file, tomli_w.dumps(node.to_node_config()).encode())
    what = f"{len(user.examples)} records" if user.examples else f"{len(user.text)} characters of text"
    log.info("user %r, %s; base %s", user.user, what, base_dir)
    # its own --compute-dtype, or where the federation's is auto, what it chooses for itself; its worker
    # reads the same cached measurement
    where = "" if opts.device.compute_dtype else " (where the federation's --compute-dtype is auto)"
    log.info("this device is %s%s", precision, where)
    return node_file, _supernode_args(opts.connect, node_file, port or free_port(RUNTIME_HOST))


def _new_secret(path: Path) -> None:
    """A fresh secret for this run of the device, readable by its owner only: the SuperNode checks each
    task claim's signature with it, so no other local user or process can take this device's tasks."""
    try:  # never through a link planted in the store
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o600)
    except OSError as e:
        raise FedpeftError(f"cannot write {path}: {e.strerror}") from None
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(secrets.token_bytes(32))


class Worker:
    """The resident worker (fedpeft.device.worker), restarted when it dies. Crashes in a row that each come
    within a minute of their start mean it cannot run (say, the store is broken): then give up."""

    MAX_QUICK_CRASHES = 5

    def __init__(self, store: Path, runtime: str, env: dict[str, str]) -> None:
        self.store, self.runtime, self.env = store, runtime, env
        self.quick_crashes = 0
        (store / LOADS_FILE).unlink(missing_ok=True)  # base_loads counts from this client's start
        (store / IN_FLIGHT_FILE).unlink(missing_ok=True)  # a task of an earlier SuperNode is gone with it
        self.proc = self._start()

    def _start(self) -> subprocess.Popen:
        self.started = time.monotonic()
        return subprocess.Popen(
            [sys.executable, "-m", "fedpeft.device.worker", str(self.store), self.runtime], env=self.env
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
    port = free_port(RUNTIME_HOST)  # kept across SuperNode restarts: the worker keeps claiming there
    _, args = prepare(opts, port)
    connect = opts.connect
    extra = {}
    if connect.threads:  # read by torch in the worker
        extra = {"OMP_NUM_THREADS": str(connect.threads), "MKL_NUM_THREADS": str(connect.threads)}
    store = Path(opts.device.store).resolve()
    _new_secret(store / SECRET_FILE)
    env = flower_env(store / "flwr", extra)
    worker = Worker(store, f"{RUNTIME_HOST}:{port}", env)
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
