"""The device worker's wire: one task per connection over a Unix-domain socket inside the device store.

A request is (kind, run id, Flower RecordDict); a reply is a RecordDict or a one-line error. Records
travel as Flower's own protobuf (flwr.common.serde), never pickle: whatever reaches the socket is parsed,
not executed. numpy + Flower only: the ClientApp process that Flower starts per message imports this and
must stay free of torch (docs/deployment.md, "On the device").

Frame: 8-byte big-endian length, then a 4-byte header length, a JSON header and the protobuf body.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flwr.app import RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

from fedpeft.errors import FedpeftError

SOCKET_NAME = "worker.sock"
# one line per base load since `fedpeft client` started (it empties the file; the worker appends)
LOADS_FILE = "base-loads"
KINDS = ("describe", "train", "update", "evaluate")  # update: secure stage 3's local training
MAX_FRAME = 2**31  # Flower caps one message at 2 GiB too
# sun_path holds 108 bytes on Linux, 104 on macOS; a longer path is reached through its folder's fd
MAX_SOCKET_PATH = 100


class WorkerGone(FedpeftError):
    """The worker closed the connection before replying (it crashed or was stopped mid-task)."""


def socket_path(store: Path) -> Path:
    return store / SOCKET_NAME


@contextlib.contextmanager
def address(path: Path) -> Iterator[str]:
    """The address to bind or connect: the path itself, or for a path longer than a socket address can
    hold, the same file through an open descriptor of its folder (/proc/self/fd/N/NAME, Linux)."""
    if len(os.fsencode(path)) <= MAX_SOCKET_PATH:
        yield str(path)
        return
    if not Path("/proc/self/fd").is_dir():
        raise FedpeftError(
            f"the store path is too long for the worker's socket ({len(os.fsencode(path))} bytes, at most "
            f"{MAX_SOCKET_PATH} here): use a shorter --store"
        )
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def encode(header: dict[str, Any], body: RecordDict | None = None) -> bytes:
    head = json.dumps(header).encode()
    data = recorddict_to_proto(body).SerializeToString() if body is not None else b""
    payload = struct.pack(">I", len(head)) + head + data
    return struct.pack(">Q", len(payload)) + payload


def _read_exactly(conn: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = conn.recv(min(n - got, 1 << 20))
        if not chunk:
            raise WorkerGone("the connection closed mid-frame")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def read_frame(conn: socket.socket) -> tuple[dict[str, Any], RecordDict | None]:
    """One frame: (header, body or None). Raises WorkerGone on EOF, ValueError on a malformed frame."""
    (size,) = struct.unpack(">Q", _read_exactly(conn, 8))
    if not 4 <= size <= MAX_FRAME:
        raise ValueError(f"frame of {size} bytes")
    payload = _read_exactly(conn, size)
    (head_len,) = struct.unpack(">I", payload[:4])
    if head_len > size - 4:
        raise ValueError("header longer than its frame")
    header = json.loads(payload[4 : 4 + head_len])
    if not isinstance(header, dict):
        raise ValueError("header is not an object")
    data = payload[4 + head_len :]
    return header, recorddict_from_proto(ProtoRecordDict.FromString(data)) if data else None


def call(path: Path, kind: str, content: RecordDict, run_id: int = 0, wait: float = 120.0) -> RecordDict:
    """Hand one task to the worker and return its reply. Waits up to `wait` seconds for the worker to
    listen (it may be starting or being restarted by `fedpeft client`). A task the worker refuses for a
    reason the user can fix raises FedpeftError with its line; a worker that dies mid-task, WorkerGone."""
    if kind not in KINDS:
        raise ValueError(f"unknown worker task {kind!r}")
    deadline = time.monotonic() + wait
    while True:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with address(path) as where:
                conn.connect(where)
            break
        except (FileNotFoundError, ConnectionRefusedError):
            conn.close()
            if time.monotonic() > deadline:
                raise FedpeftError(
                    f"the device worker is not running (no listener on {path} after {wait:.0f} s); "
                    "is `fedpeft client` running?"
                ) from None
            time.sleep(0.2)
    with conn:
        try:
            conn.sendall(encode({"kind": kind, "run": run_id}, content))
            header, body = read_frame(conn)
        except (ConnectionError, BrokenPipeError) as e:
            raise WorkerGone(f"the connection broke: {e}") from None
    if "error" in header:
        raise FedpeftError(str(header["error"]))
    if body is None:
        raise WorkerGone("the worker replied without a body")
    return body
