"""The resident device worker: one long-lived process per device that holds the quantized base, the owner's
tokenized text and the personal store, and runs every task of every round.

Flower's SuperNode starts a fresh ClientApp process for each message (flwrlabs/flower#3670 asks for
persistent apps); loading the base there cost a device two loads a round and most of its memory. Our
ClientApp (fedpeft.flower.client_app) imports no torch: it forwards the task over a Unix-domain socket inside the
store (folder 0700, socket 0600, and the peer's uid checked with SO_PEERCRED where the OS has it) and
returns the reply. `fedpeft client` starts this process, restarts it if it dies and stops it on exit.

Secure aggregation stays in the ClientApp (its state in Flower's context.state, as before): the worker
only trains in stage 3, so a worker restart mid-round makes the device a stage-3 dropout and nothing of
the protocol's secrets ever lives here.

    python -m fedpeft.device.worker STORE      # STORE holds node-config.toml (written by `fedpeft client`)
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import stat
import struct
import sys
import threading
import time
import tomllib
import traceback
from pathlib import Path

from fedpeft.config.node import DeviceConfig
from fedpeft.device import tasks
from fedpeft.device.link import KINDS, LOADS_FILE, address, encode, read_frame, socket_path
from fedpeft.errors import FedpeftError
from fedpeft.log import quiet_libraries, setup_console

log = logging.getLogger("fedpeft")
READ_TIMEOUT = 600.0  # a task's request must arrive within this; the worker serves one task at a time


def read_node(store: Path) -> DeviceConfig:
    try:
        data = tomllib.loads((store / "node-config.toml").read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise FedpeftError(f"cannot read {store / 'node-config.toml'}: {e}") from None
    node = DeviceConfig.from_node_config(data)
    if node is None:
        raise FedpeftError(
            f"{store / 'node-config.toml'} has no data-path; start the device with `fedpeft client`"
        )
    return node


def peer_uid(conn: socket.socket) -> int | None:
    """The connecting process's uid (Linux SO_PEERCRED); None where the OS does not tell."""
    opt = getattr(socket, "SO_PEERCRED", None)
    if opt is None:
        return None
    _, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, opt, struct.calcsize("3i")))
    return uid


def listen(store: Path) -> socket.socket:
    """Bind the socket inside the store, readable and writable by the store's owner only."""
    os.chmod(store, 0o700)  # the socket's folder: no one else may even reach the socket
    path = socket_path(store)
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise FedpeftError(f"{path} exists and is not a socket; remove it")
        path.unlink()  # a previous worker's, left by a crash
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # created 0600: no window in which another user could connect
    try:
        with address(path) as where:
            sock.bind(where)
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(4)
    return sock


def _count_loads(store: Path) -> int:
    try:
        return len((store / LOADS_FILE).read_text().splitlines())
    except OSError:
        return 0


def serve_one(conn: socket.socket, node: DeviceConfig) -> None:
    """Read one task, run it, write its reply (or its one-line error)."""
    uid = peer_uid(conn)
    if uid is not None and uid != os.getuid():
        log.warning("refused a connection from uid %d (the store belongs to uid %d)", uid, os.getuid())
        return
    conn.settimeout(READ_TIMEOUT)
    header, content = read_frame(conn)
    kind = header.get("kind")
    if kind not in KINDS or content is None:
        conn.sendall(encode({"error": f"unknown task {kind!r}"}))
        return
    conn.settimeout(None)
    try:
        reply = tasks.run(str(kind), content, node)
    except FedpeftError as e:
        print(f"fedpeft: error: {e}", file=sys.stderr, flush=True)
        conn.sendall(encode({"error": str(e)}))
        return
    except Exception as e:  # a bug: keep the traceback in the device's log, send one line
        traceback.print_exc()
        conn.sendall(encode({"error": f"device worker failed: {type(e).__name__}: {e}"[:500]}))
        return
    conn.sendall(encode({"ok": True}, reply))


def _watch_parent(parent: int) -> None:
    """Exit when `fedpeft client` is gone (even killed -9): the worker must not outlive its device."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


def serve(store: Path) -> None:
    # torch: imported after the store and node config are checked, so a refusal is quick
    from fedpeft.device import runtime as device

    node = read_node(store)
    sock = listen(store)
    path = socket_path(store)
    tasks.STATS.update(root_pid=os.getppid(), loads_before=_count_loads(store))
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()

    def stop(*_: object) -> None:
        path.unlink(missing_ok=True)
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    log.info("device worker %d listening on %s", os.getpid(), path)
    loads = 0
    while True:
        conn, _ = sock.accept()
        with conn:
            try:
                serve_one(conn, node)
            except (OSError, ValueError) as e:  # a caller that went away or sent garbage
                log.warning("dropped a task connection: %s", e)
        if device.BASE_LOADS[0] > loads:  # counted across restarts for the round's base_loads
            with open(store / LOADS_FILE, "a") as f:
                f.write(f"{time.time():.0f} {os.getpid()}\n" * (device.BASE_LOADS[0] - loads))
            loads = device.BASE_LOADS[0]


def main(argv: list[str]) -> int:
    setup_console()
    quiet_libraries()
    if len(argv) != 1:
        print("usage: python -m fedpeft.device.worker STORE", file=sys.stderr)
        return 2
    try:
        serve(Path(argv[0]).resolve())
    except FedpeftError as e:
        print(f"fedpeft: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
