"""`fedpeft simulate --ray-address`: a federation on an existing Ray cluster, for real. The test starts a
Ray head and a second Ray node on 127.0.0.1 (each in its own session and temp folder), runs a federation
across both, checks that each node hosted a client actor, and stops only the processes it started."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from fedpeft.config.tree import (
    AdapterConfig,
    BaseConfig,
    DataConfig,
    FederationConfig,
    RunConfig,
    TrainConfig,
)
from fedpeft.processes import free_port, session_members, stop_session
from fedpeft.simulation.run import simulate
from tests.conftest import make_text

ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))
pytestmark = pytest.mark.simulation


class Node:
    """`ray start --block` in a session of its own: stopping the session stops everything it started."""

    def __init__(self, name: str, *args: str) -> None:
        # short: Ray's socket paths live under it and AF_UNIX paths are limited to 107 bytes
        self.temp = Path(tempfile.mkdtemp(prefix=f"fr-{name}-", dir="/tmp"))
        self.log = self.temp.with_suffix(".log")
        env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(
                [RAY, "start", "--block", "--num-cpus", "1", "--num-gpus", "0", "--temp-dir", str(self.temp), *args],
                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=ROOT,
            )  # fmt: skip

    def stop(self) -> None:
        stop_session(self.proc.pid)
        self.proc.wait(timeout=30)
        shutil.rmtree(self.temp, ignore_errors=True)
        self.log.unlink(missing_ok=True)


def _wait_for_nodes(address: str, n: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    code = f"import ray; ray.init(address={address!r}, logging_level='error'); print(sum(1 for x in ray.nodes() if x['Alive']))"
    while time.monotonic() < deadline:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        if done.returncode == 0 and done.stdout.strip().splitlines()[-1:] == [str(n)]:
            return
        time.sleep(2)
    raise AssertionError(f"the Ray cluster at {address} did not reach {n} nodes")


def _actor_nodes(address: str) -> dict[str, int]:
    """Flower's client actors of the cluster (alive or finished) by the node that hosted them, read from
    Ray's control store in a separate driver."""
    code = (
        f"import json, ray; from ray._private.state import state; ray.init(address={address!r}, logging_level='error');"
        "actors = state.actor_table(None).values();"
        "print(json.dumps([a['Address']['NodeID'] for a in actors if 'ClientAppActor' in a.get('ActorClassName', '')]))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    import json

    counts: dict[str, int] = {}
    for node in json.loads(done.stdout.strip().splitlines()[-1]):
        counts[node] = counts.get(node, 0) + 1
    return counts


def test_a_federation_runs_on_an_existing_two_node_ray_cluster(
    tmp_path: Path, cache_dir: str, tiny_path: Path
) -> None:
    users = tmp_path / "users"
    users.mkdir()
    for i in range(4):
        (users / f"user{i}.txt").write_text(make_text(30 + i, 400))
    port = free_port()
    address = f"127.0.0.1:{port}"
    head = Node("head", "--head", "--port", str(port), "--include-dashboard=false")
    second = None
    try:
        _wait_for_nodes(address, 1)
        second = Node("node2", "--address", address)
        _wait_for_nodes(address, 2)
        cfg = RunConfig(
            base=BaseConfig(model="tiny", quant="none", cache_dir=cache_dir),
            adapter=AdapterConfig(kind="lora", r=4),
            data=DataConfig(data=str(users), block_size=32),
            train=TrainConfig(lr=5e-3, batch_size=4, progress=False),
            federation=FederationConfig(
                clients=4, fraction=1.0, rounds=2, local_steps=2, ray_address=address
            ),
        )
        state = simulate(cfg, tmp_path / "run")
        assert state.round == 2 and state.history[-1]["accepted"] == [f"user{i}" for i in range(4)]
        assert state.history[-1]["eval_ppl"] < state.history[0]["eval_ppl"]
        nodes = _actor_nodes(address)
        assert len(nodes) == 2, nodes  # one client actor on each node (1 CPU each, 1 CPU per actor)
        # the cluster outlives the run: fedpeft stopped only what it started
        assert head.proc.poll() is None and second.proc.poll() is None
    finally:
        for node in (second, head):
            if node is not None:
                node.stop()
    assert all(not session_members(n.proc.pid) for n in (head, second) if n is not None)
