"""The resident device worker and its wire: a real worker process on the tiny model, reached through the
real ClientApp handlers in a process that must never import torch."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import tomli_w
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedpeft.config.node import DeviceNode
from fedpeft.device.link import WorkerGone, address, encode, read_frame, socket_path
from tests.conftest import make_text

ROOT = Path(__file__).resolve().parents[2]


def test_a_record_dict_crosses_the_wire_unchanged() -> None:
    content = RecordDict(
        {
            "task": ConfigRecord({"round": 3, "tag": b"\x00\xff", "name": "alice", "ok": True}),
            "arrays": ArrayRecord({"a": Array(np.arange(6, dtype=np.float32).reshape(2, 3))}),
            "metrics": MetricRecord({"loss": 1.5}),
        }
    )
    a, b = socket.socketpair()
    with a, b:
        a.sendall(encode({"kind": "train", "run": 7}, content))
        header, back = read_frame(b)
    assert header == {"kind": "train", "run": 7}
    assert dict(back["task"]) == dict(content["task"])
    np.testing.assert_array_equal(back["arrays"]["a"].numpy(), content["arrays"]["a"].numpy())
    assert back["metrics"]["loss"] == 1.5


def test_a_frame_cut_short_is_worker_gone_and_a_lying_length_is_refused() -> None:
    frame = encode({"kind": "train"}, RecordDict({"task": ConfigRecord({"x": 1})}))
    a, b = socket.socketpair()
    with a, b:
        a.sendall(frame[:-3])
        a.close()
        with pytest.raises(WorkerGone):
            read_frame(b)
    a, b = socket.socketpair()
    with a, b:
        a.sendall((2**40).to_bytes(8, "big"))
        with pytest.raises(ValueError, match="frame of"):
            read_frame(b)


def test_a_socket_path_longer_than_an_address_still_binds_and_connects(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 120)
    deep.mkdir()
    path = socket_path(deep)
    server = socket.socket(socket.AF_UNIX)
    with address(path) as where:
        server.bind(where)
    server.listen(1)
    client = socket.socket(socket.AF_UNIX)
    with address(path) as where:
        client.connect(where)
    client.close()
    server.close()
    assert stat.S_ISSOCK(path.lstat().st_mode)


@pytest.fixture
def worker(tmp_path: Path, tiny_path: Path, cache_dir: str):
    """A worker process on a store holding alice's text and the tiny base. The store sits in a folder of
    its own under the system temp dir that another user can traverse (pytest's is 0700)."""
    top = Path(tempfile.mkdtemp(prefix="fedpeft-worker-"))
    top.chmod(0o755)
    store = top / "store"
    store.mkdir(mode=0o755)
    data = tmp_path / "alice.txt"
    data.write_text(make_text(21, 600))
    node = DeviceNode(
        data_path=str(data),
        name="alice",
        model=str(tiny_path),
        cache_dir=cache_dir,
        store=str(store),
        personal_dir=str(store / "personal"),
        worker=str(socket_path(store)),
    )
    (store / "node-config.toml").write_text(tomli_w.dumps(node.to_node_config()))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "fedpeft.device.worker", str(store)], env=env)
    deadline = time.monotonic() + 60
    while not socket_path(store).exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the worker did not start"
        time.sleep(0.1)
    yield store, node, proc
    proc.terminate()
    proc.wait(10)
    shutil.rmtree(top, ignore_errors=True)


# Runs in a fresh interpreter: two rounds through the real ClientApp handlers, then reports what it saw.
THIN_APP = r"""
import json, sys
import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from fedpeft.flower.client_app import describe, evaluate, train
from fedpeft.federation.wire import arrays_to_record, record_to_arrays
from fedpeft.config.tree import RunConfig, AdapterConfig, DataConfig, TrainConfig, FederationConfig
from fedpeft.config.files import to_run_config
from flwr.supercore.task_identity import TaskIdentity

TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1  # as a SuperNode's process has
node = json.loads(sys.argv[1])
cfg = RunConfig(adapter=AdapterConfig(r=4), data=DataConfig(block_size=32),
                train=TrainConfig(batch_size=2), federation=FederationConfig(local_steps=2, secagg=True))
config = ConfigRecord(to_run_config(cfg))
context = Context(1, 1, node, RecordDict(), {})

def ask(handler, kind, task, arrays=None):
    content = RecordDict({"config": config, "task": ConfigRecord(task)})
    if arrays is not None:
        content["arrays"] = arrays_to_record(arrays)
    reply = handler(Message(content, dst_node_id=1, message_type=kind), context)
    assert not reply.has_error(), reply.error.reason
    return reply.content

first = ask(describe, "query", {"with-init": True})
fingerprint = first["info"]["fingerprint"]
glob = record_to_arrays(first["init"])
out = {"rounds": []}
for rnd in (1, 2):
    reply = ask(train, "train", {"round": rnd, "client": 0, "fingerprint": fingerprint}, glob)
    delta = record_to_arrays(reply["delta"])
    glob = {k: glob[k] + delta[k] for k in delta} | {k: v for k, v in glob.items() if k not in delta}
    ev = ask(evaluate, "evaluate", {"round": rnd, "client": 0, "fingerprint": fingerprint}, glob)
    out["rounds"].append({**dict(reply["metrics"]), "eval_loss": ev["metrics"]["eval_loss"]})
out["torch"] = "torch" in sys.modules or "transformers" in sys.modules
print(json.dumps(out))
"""


def test_the_clientapp_forwards_to_a_worker_that_loads_its_base_once(worker) -> None:
    store, node, proc = worker
    assert stat.S_IMODE(store.stat().st_mode) == 0o700
    assert stat.S_IMODE(socket_path(store).lstat().st_mode) == 0o600
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", THIN_APP, json.dumps(node.to_node_config())],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["torch"] is False  # the per-message process stayed light
    r1, r2 = out["rounds"]
    assert r1["base_loads"] == r2["base_loads"] == 1
    assert r1["load_seconds"] > 0 and r2["load_seconds"] < 0.5  # the second round found the base resident
    assert r2["eval_loss"] < r1["eval_loss"] or np.isclose(r2["eval_loss"], r1["eval_loss"], rtol=0.05)
    assert r1["peak_rss_mib"] > 100  # the worker holds torch and the base
    assert (store / "base-loads").read_text().count("\n") == 1
    assert proc.poll() is None


def test_the_worker_refuses_another_users_connection(worker) -> None:
    """The folder (0700) and the socket (0600) keep other users out; were they opened up by mistake, the
    worker still checks the peer's uid (SO_PEERCRED) and closes without reading a byte."""
    if not hasattr(socket, "SO_PEERCRED"):
        pytest.skip("this OS does not report a Unix socket peer's uid")
    if os.getuid() != 0:
        pytest.skip("needs root to connect as another user")
    store, _, proc = worker
    path = socket_path(store)
    os.chmod(store, 0o755)
    os.chmod(path, 0o666)
    pid = os.fork()
    if pid == 0:  # the other user
        code = 1
        try:
            os.setgid(65534)
            os.setuid(65534)
            s = socket.socket(socket.AF_UNIX)
            with address(path) as where:
                s.connect(where)
            try:
                s.sendall(encode({"kind": "describe"}, RecordDict({"task": ConfigRecord({})})))
                code = 0 if s.recv(1) == b"" else 3  # closed: no reply, not even an error
            except (BrokenPipeError, ConnectionResetError):
                code = 0  # closed before it even read the request
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert proc.poll() is None  # and it serves its owner on
