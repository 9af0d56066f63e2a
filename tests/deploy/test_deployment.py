"""Real deployments on 127.0.0.1: `fedpeft server` and `fedpeft client` processes (Flower SuperLink and
SuperNodes) with TLS and node authentication, bounded in time, and nothing left running afterwards."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from fedpeft.cli import main as fedpeft_main
from fedpeft.deploy.certs import make_certs
from fedpeft.processes import Child, descendants, flower_env, free_port, process_table, stop_tree
from tests.conftest import make_text

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.deployment


@pytest.fixture(scope="module")
def users(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dep-users")
    (root / "alice.txt").write_text(make_text(11, 500))
    (root / "bob.txt").write_text(make_text(12, 450))
    (root / "carol").mkdir()  # a device whose text is a folder of files
    (root / "carol" / "a.txt").write_text(make_text(13, 250))
    (root / "carol" / "b.txt").write_text(make_text(14, 250))
    (root / "dave.txt").write_text(
        make_text(15, 300)
    )  # the least text: not among the top 3 of a natural split
    return root


def _flags(users: Path, cache_dir: str, *extra: str) -> list[str]:
    return [
        "--model", "tiny", "--cache-dir", cache_dir, "--lora-r", "4", "--data", str(users),
        "--block-size", "32", "--lr", "5e-3", "--fraction", "1", "--local-steps", "2", "--seed", "1",
        "--no-progress",
        # the deployed devices and the simulation they are compared with compute alike (each would resolve
        # auto on its own, with its own threads)
        "--compute-dtype", "fp32", *extra,
    ]  # fmt: skip


class Deployment:
    """Processes started by one test; all stopped (with whatever they spawned) at teardown."""

    def __init__(self, root: Path) -> None:
        self.root, self.children = root, []
        self.env = flower_env(root / "flwr", {"PYTHONPATH": str(ROOT)})
        self.port = free_port()

    def fedpeft(self, name: str, *args: str) -> Child:
        child = Child([sys.executable, "-m", "fedpeft.cli", *args], self.root / f"{name}.log", self.env, name)
        self.children.append(child)
        return child

    def server(self, certs: Path, *flags: str) -> Child:
        return self.fedpeft(
            "server",
            "server",
            "--out",
            str(self.root / "server"),
            "--certs",
            str(certs),
            "--port",
            str(self.port),
            *flags,
        )

    def client(self, name: str, data: Path, certs: Path, model: str, key_name: str | None = None) -> Child:
        return self.fedpeft(
            name, "client", "--server", f"127.0.0.1:{self.port}", "--root-cert", str(certs / "ca.pem"),
            "--key", str(certs / "clients" / f"{key_name or name}.key"), "--data", str(data), "--name", name,
            "--store", str(self.root / "stores" / name), "--model", model,
        )  # fmt: skip

    def wait(self, child: Child, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while child.alive():
            assert time.monotonic() < deadline, (
                f"{child.name} still running after {timeout} s:\n{child.log_tail(20)}"
            )
            time.sleep(1)
        return int(child.proc.returncode)

    def metrics(self) -> list[dict]:
        path = self.root / "server" / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []

    def stop(self) -> None:
        for child in reversed(self.children):
            child.stop()


def _ours_running(root: Path) -> list[str]:
    """Command lines of live processes that mention this test's folder (should be none at the end)."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if str(root) in cmd and state != "Z" and int(proc.name) != os.getpid():
            found.append(cmd[:200])
    return found


class DeviceProcesses:
    """Every 0.2 s while it runs: the command lines of all processes below this test's `fedpeft client`
    processes. A device runs three of its own and nothing else: no Flower SuperExec, no ClientApp
    process per message (fedpeft.device.worker)."""

    def __init__(self, root: Path) -> None:
        self.root, self.seen = str(root), set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            table = process_table()
            for pid, proc in table.items():
                if "fedpeft.cli client" in proc.cmdline and self.root in proc.cmdline:
                    self.seen |= {
                        table[p].cmdline.split(" --")[0] for p in descendants(pid, table) if p in table
                    }
            time.sleep(0.2)

    def stop(self) -> set[str]:
        self._stop.set()
        self._thread.join()
        return self.seen


@pytest.fixture
def deployment(tmp_path: Path):
    d = Deployment(tmp_path)
    yield d
    d.stop()
    time.sleep(1)
    assert _ours_running(tmp_path) == [], "processes left running"


def _other_base(tiny_path: Path, dest: Path) -> Path:
    """The tiny model with one weight nudged: another base fingerprint."""
    shutil.copytree(tiny_path, dest)
    weights = dest / "model.safetensors"
    tensors = load_file(weights)
    name = next(k for k in sorted(tensors) if k.endswith("q_proj.weight"))
    tensors[name] = tensors[name] + np.float32(0.01).astype(tensors[name].dtype)
    save_file(tensors, weights, metadata={"format": "pt"})
    return dest


@pytest.mark.slow  # minutes of real processes each: CI's second pass (pyproject, markers)
def test_secure_federation_over_tls_equals_simulation_and_refuses_strangers(
    deployment: Deployment, tmp_path: Path, users: Path, cache_dir: str, tiny_path: Path
) -> None:
    certs = make_certs(tmp_path / "certs", ["127.0.0.1"], ["alice", "bob", "carol", "zz-other"]).root
    intruder = make_certs(tmp_path / "intruder-certs", ["127.0.0.1"], ["intruder"]).root  # never registered
    other = _other_base(tiny_path, tmp_path / "other-base")

    # distributed DP with negligible noise: each device adds its own inside secure aggregation
    dp = ("--secagg", "--dp", "distributed", "--dp-noise-multiplier", "1e-9")
    server = deployment.server(certs, *_flags(users, cache_dir, "--clients", "4", "--rounds", "2", *dp))
    time.sleep(3)
    for name, data in (
        ("alice", users / "alice.txt"),
        ("bob", users / "bob.txt"),
        ("carol", users / "carol"),
    ):
        deployment.client(name, data, certs, str(tiny_path))
    deployment.client("zz-other", users / "alice.txt", certs, str(other))
    stranger = deployment.client("intruder", users / "bob.txt", intruder, str(tiny_path))
    watch = DeviceProcesses(tmp_path)
    # once the federation runs, another app's run on the same SuperLink: refused by every device
    deadline = time.monotonic() + 300
    while not deployment.metrics():
        assert time.monotonic() < deadline and server.alive(), server.log_tail(20)
        time.sleep(1)
    foreign = _run_foreign_app(
        tmp_path, flower_env(tmp_path / "server" / "superlink" / "flwr", {"PYTHONPATH": str(ROOT)})
    )
    assert deployment.wait(server, 420) == 0, server.log_tail(30)
    seen = watch.stop()
    # each device: the SuperNode launcher and the resident worker (and the base's one-off conversion)
    assert any("fedpeft.device.supernode" in c for c in seen) and any(
        "fedpeft.device.worker" in c for c in seen
    )
    assert not [c for c in seen if "flwr-clientapp" in c or "flower-superexec" in c], seen

    # the global adapter equals a simulation of the same three users with the same seed
    fedpeft_main(["simulate", *_flags(users, cache_dir, "--clients", "3", "--rounds", "2", *dp),
                  "--out", str(tmp_path / "sim")])  # fmt: skip
    sim = load_file(tmp_path / "sim" / "global" / "adapter_model.safetensors")
    dep = load_file(tmp_path / "server" / "global" / "adapter_model.safetensors")
    assert sim.keys() == dep.keys()
    from fedpeft.federation.state import checkpoint_path, load_checkpoint

    # round 1 sums the same deltas: equal within the ring code's rounding and the devices' noise, which is
    # secret randomness drawn afresh in every run, simulated or deployed (about a ring unit a coordinate at
    # z = 1e-9); round 2 trains on from the two globals, and fp32 compute lets AdamW's sign-like early steps
    # amplify that difference where a gradient is near zero (benchmarks/README.md, "Deployment": two
    # simulations differ as much): close as a whole there
    first = [load_checkpoint(checkpoint_path(tmp_path / run, 1)).arrays for run in ("sim", "server")]
    for k, v in first[0].items():
        np.testing.assert_allclose(first[1][k], v, atol=1e-6)
    for k in sim:
        assert np.linalg.norm(dep[k] - sim[k]) <= 1e-3 * np.linalg.norm(sim[k]) + 1e-6, k
    history = deployment.metrics()
    assert [h["round"] for h in history] == [0, 1, 2]
    for h in history[1:]:
        assert h["accepted"] == ["alice", "bob", "carol"] and not h["skipped"]
        assert h["dp"]["mode"] == "distributed" and h["dp"]["counted"] == 3  # every survivor's noise is in
        (refused,) = h["rejected"]
        assert refused["client"] == "zz-other" and "differs from the federation's" in refused["reason"]
    assert set(history[-1]["eval_per_client"]) == {"alice", "bob", "carol"}
    # the device itself said why, before any training
    other_log = (tmp_path / "zz-other.log").read_text()
    assert "refused: this device's base" in other_log
    # the unregistered key never joined
    assert all("intruder" not in json.dumps(h) for h in history)
    assert "did not accept this device" in stranger.log_path.read_text()
    # the other app's run: every device that joined refused it, naming what it runs and what was asked
    deadline = time.monotonic() + 120
    while not foreign.is_file():
        assert time.monotonic() < deadline, "the foreign ServerApp wrote nothing"
        time.sleep(1)
    answers = json.loads(foreign.read_text())
    assert len(answers) == 4, answers
    for reason in answers:
        assert "refused: this device runs fedpeft" in reason and "someone/foreignapp 9.9.9" in reason, reason
    assert (tmp_path / "server" / "superlink" / "state.db").is_file()


# Another Flower app, run beside ours on the same SuperLink: it asks every node to describe itself and writes
# what came back. A device runs only its own fedpeft, so every answer must be a refusal.
FOREIGN_PYPROJECT = """
[project]
name = "foreignapp"
version = "9.9.9"

[tool.flwr.app]
publisher = "someone"

[tool.flwr.app.components]
serverapp = "foreignapp:server"
clientapp = "foreignapp:client"

[tool.flwr.app.config]
out = ""
"""
FOREIGN_APP = """
import json, time
from pathlib import Path
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

server = ServerApp()
client = ClientApp()

@server.main()
def main(grid: Grid, context: Context) -> None:
    deadline, nodes = time.time() + 120, []
    while len(nodes) < 4 and time.time() < deadline:
        nodes = list(grid.get_node_ids())
        time.sleep(1)
    asks = [Message(RecordDict({"task": ConfigRecord({"with-init": False})}), dst_node_id=n, message_type="query")
            for n in nodes]
    replies = grid.send_and_receive(asks, timeout=120)
    out = [r.error.reason if r.has_error() else "answered" for r in replies]
    Path(context.run_config["out"]).write_text(json.dumps(out))
"""


def _run_foreign_app(tmp_path: Path, env: dict[str, str]) -> Path:
    """Submit the foreign app to the test's SuperLink; returns the file its ServerApp will write."""
    from fedpeft.deploy.server import CONNECTION
    from fedpeft.processes import flwr

    app = tmp_path / "foreign"
    app.mkdir()
    (app / "pyproject.toml").write_text(FOREIGN_PYPROJECT)
    (app / "foreignapp.py").write_text(FOREIGN_APP)
    out = tmp_path / "foreign-replies.json"
    flwr(["run", str(app), CONNECTION, "--run-config", f'out="{out}"'], env)
    return out


def _pid_of(*needles: str) -> int:
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if all(n in cmd for n in needles):
            return int(proc.name)
    raise AssertionError(f"no process with {needles}")


@pytest.mark.slow  # minutes of real processes each: CI's second pass (pyproject, markers)
def test_deploy_local_survives_a_client_killed_mid_round_and_a_superlink_restart(
    deployment: Deployment, tmp_path: Path, users: Path, cache_dir: str, tiny_path: Path
) -> None:
    out = tmp_path / "dl"
    # four devices: with one gone, three remain, each masked by two others (the devices' default floor)
    flags = _flags(users, cache_dir, "--clients", "4", "--rounds", "3", "--secagg", "--connect-timeout", "20")
    local = deployment.fedpeft("deploy-local", "deploy-local", *flags, "--out", str(out))
    carol_log = out / "clients" / "carol" / "client.log"
    metrics = out / "server" / "metrics.jsonl"
    # carol vanishes once round 1's stage 3 (local training, then masking) has reached her: its second train
    # message, stage 1 having come with round 0's evaluation
    deadline = time.monotonic() + 300
    while (
        not carol_log.is_file() or carol_log.read_text(errors="replace").count("Receiving: train message") < 2
    ):
        assert time.monotonic() < deadline and local.alive(), local.log_tail(20)
        time.sleep(0.2)
    stop_tree(_pid_of("fedpeft.cli client", "--name carol"), timeout=0)
    # the SuperLink dies right after round 1 is checkpointed
    while not metrics.is_file() or len(metrics.read_text().splitlines()) < 2:
        assert time.monotonic() < deadline and local.alive(), local.log_tail(20)
        time.sleep(0.5)
    os.kill(_pid_of("flower-superlink", str(out)), signal.SIGKILL)
    assert deployment.wait(local, 600) == 0, local.log_tail(30)

    history = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [h["round"] for h in history] == [0, 1, 2, 3]
    one = history[1]
    assert not one["skipped"] and one["accepted"] == ["alice", "bob", "dave"]  # the survivors' sum, unmasked
    assert [r["client"] for r in one["rejected"]] == ["carol"] and "stage 3" in one["rejected"][0]["reason"]
    assert all(not h["skipped"] and h["accepted"] == ["alice", "bob", "dave"] for h in history[2:])
    assert history[-1]["eval_ppl"] < history[0]["eval_ppl"]
    log = local.log_path.read_text()
    assert "restarting it on the same state" in log and "resumed from" in log
    assert json.loads((out / "server" / "status.json").read_text())["state"] == "finished"


def test_a_serverapp_that_dies_is_reported_and_everything_stops(
    deployment: Deployment, tmp_path: Path, users: Path, cache_dir: str, tiny_path: Path
) -> None:
    out = tmp_path / "dl"
    local = deployment.fedpeft(
        "deploy-local",
        "deploy-local",
        *_flags(users, cache_dir, "--clients", "3", "--rounds", "3"),
        "--out",
        str(out),
    )
    deadline = time.monotonic() + 300
    while not (out / "server" / "metrics.jsonl").is_file():
        assert time.monotonic() < deadline and local.alive(), local.log_tail(20)
        time.sleep(0.5)
    os.kill(_pid_of("flwr-serverapp", "--runtime-api-address"), signal.SIGKILL)
    assert deployment.wait(local, 120) == 2
    assert "the ServerApp ended without a result" in local.log_path.read_text()
    # what it had checkpointed is still there to --resume from
    assert (out / "server" / "checkpoints" / "round-000").is_dir()


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.slow  # minutes of real processes each: CI's second pass (pyproject, markers)
def test_each_device_loads_its_base_once_and_a_worker_killed_mid_round_is_restarted(
    deployment: Deployment, tmp_path: Path, users: Path, cache_dir: str
) -> None:
    """The resident worker: one base load per device over a secure federation; bob's worker killed while
    it trains in round 1 makes bob that round's stage-3 dropout, `fedpeft client` restarts it, and bob is
    back (with a second load) from round 2 on."""
    out = tmp_path / "dl"
    flags = _flags(users, cache_dir, "--clients", "4", "--rounds", "3", "--secagg", "--local-steps", "60")
    local = deployment.fedpeft("deploy-local", "deploy-local", *flags, "--out", str(out))
    bob_log = out / "clients" / "bob" / "client.log"
    deadline = time.monotonic() + 300
    while not bob_log.is_file() or bob_log.read_text(errors="replace").count("Receiving: train message") < 2:
        assert time.monotonic() < deadline and local.alive(), local.log_tail(20)
        time.sleep(0.1)
    worker = _pid_of("fedpeft.device.worker", str(out / "clients" / "bob"))
    idle = _cpu_seconds(worker)
    while _cpu_seconds(worker) < idle + 0.5:  # it has started training
        assert time.monotonic() < deadline and local.alive(), local.log_tail(20)
        time.sleep(0.05)
    os.kill(worker, signal.SIGKILL)
    assert deployment.wait(local, 600) == 0, local.log_tail(30)

    history = deployment.metrics() or [
        json.loads(line) for line in (out / "server" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [h["round"] for h in history] == [0, 1, 2, 3]
    one = history[1]
    assert [r["client"] for r in one["rejected"]] == ["bob"] and "stage 3" in one["rejected"][0]["reason"]
    assert one["accepted"] == ["alice", "carol", "dave"]
    for h in history[2:]:
        assert h["accepted"] == ["alice", "bob", "carol", "dave"]
    for h in history[1:]:
        for name, figures in h["client_seconds"].items():
            assert figures["base_loads"] == (2 if name == "bob" else 1), (h["round"], name, figures)
            assert figures["peak_rss_mib"] > 100 and figures["wait"] >= 0
    assert "the device worker exited" in bob_log.read_text()
