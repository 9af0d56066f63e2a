"""No orphans: `fedpeft simulate` killed with SIGKILL leaves no process of its run behind (real Ray)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from fedpeft.processes import session_members
from fedpeft.simulation.engine import SESSION_FILE
from tests.conftest import make_text

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.simulation


def _start(
    tmp_path: Path, cache_dir: str, stderr: Any = subprocess.DEVNULL
) -> tuple[subprocess.Popen, Path, int]:
    """A long federation on the tiny model; returns once its rounds are running on Ray."""
    users = tmp_path / "users"
    users.mkdir()
    for i in range(4):
        (users / f"u{i}.txt").write_text(make_text(i, 400))
    run = tmp_path / "run"
    args = ["simulate", "--model", "tiny", "--cache-dir", cache_dir, "--data", str(users), "--clients", "4"]
    args += [
        "--rounds",
        "5000",
        "--block-size",
        "32",
        "--local-steps",
        "1",
        "--no-progress",
        "--out",
        str(run),
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedpeft.cli", *args],
        stdout=subprocess.DEVNULL,
        stderr=stderr,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        start_new_session=True,
    )
    deadline = time.monotonic() + 240
    metrics = run / "metrics.jsonl"
    while not metrics.is_file() or len(metrics.read_text().splitlines()) < 3:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.5)
    sid = json.loads((run / SESSION_FILE).read_text())["session"]
    assert len(session_members(sid)) >= 4  # the driver, Ray's GCS, raylet, agents, the client actor
    return proc, run, sid


def _gone(sid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while session_members(sid) and time.monotonic() < deadline:
        time.sleep(0.2)
    return not session_members(sid)


def _simulate_again(run: Path, cache_dir: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedpeft.cli", "simulate", "--model", "tiny", "--cache-dir", cache_dir]
        + ["--out", str(run)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_kill_9_of_simulate_leaves_no_process_of_the_run(
    tmp_path: Path, cache_dir: str, tiny_path: Path
) -> None:
    proc, run, sid = _start(tmp_path, cache_dir)
    members = set(session_members(sid))
    second = _simulate_again(run, cache_dir)  # a second command on a live run folder stops nothing of it
    assert second.returncode == 2 and "a federation is running in" in second.stderr, second.stderr
    assert (
        proc.poll() is None and sid in session_members(sid) and len(session_members(sid)) >= len(members) - 1
    )
    proc.kill()
    proc.wait()
    assert _gone(sid, 30), [Path(f"/proc/{p}/cmdline").read_bytes()[:80] for p in session_members(sid)]
    assert not (run / SESSION_FILE).exists() and not (run / "ray").exists()


def test_an_interrupt_prints_one_line_exits_130_and_leaves_no_process(
    tmp_path: Path, cache_dir: str, tiny_path: Path
) -> None:
    """Ctrl-C: the user asked to stop, so neither Ray's "SIGTERM received" lines nor Flower's traceback for the
    actors it loses may follow; "fedpeft: interrupted" is all."""
    log = tmp_path / "stderr.txt"
    with open(log, "wb") as err:
        proc, run, sid = _start(tmp_path, cache_dir, err)
        before = log.stat().st_size
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130
    after = log.read_bytes()[before:].decode(errors="replace")
    assert after.strip().splitlines()[-1:] == ["fedpeft: interrupted"], after[-2000:]
    assert "SIGTERM" not in after and "Traceback" not in after and "Error" not in after, after[-2000:]
    assert _gone(sid, 30)


def test_what_a_killed_run_left_is_stopped_at_the_next_start_in_its_folder(
    tmp_path: Path, cache_dir: str, tiny_path: Path
) -> None:
    proc, run, sid = _start(tmp_path, cache_dir)
    os.kill(sid, signal.SIGKILL)  # the driver (which would stop its session) and the command at once
    proc.kill()
    proc.wait()
    time.sleep(3)
    left = session_members(sid)
    assert left  # Ray's agents outlive their driver: this is what the next start must stop
    again = _simulate_again(run, cache_dir)
    assert again.returncode == 2 and "already holds a federation" in again.stderr
    assert f"stopped {len(left)} processes left in {run}" in again.stderr
    assert _gone(sid, 5)
    assert not (run / SESSION_FILE).exists()


def test_many_virtual_clients_leave_a_core_to_flowers_engine() -> None:
    from dataclasses import replace

    from fedpeft.config.tree import RunConfig
    from fedpeft.simulation.engine import actor_threads, backend_config

    assert actor_threads(10, 2, 2) == 2 and actor_threads(1000, 16, 16) == 16  # every core
    assert actor_threads(3000, 2, 2) == 1 and actor_threads(10_000, 16, 16) == 15
    assert actor_threads(10_000, 4, 16) == 4 and actor_threads(10_000, 1, 1) == 1
    cfg = RunConfig()
    cfg = replace(cfg, base=replace(cfg.base, device="cpu"))
    local, threads = backend_config(cfg, "/tmp/x")
    assert local["init_args"]["_temp_dir"] == "/tmp/x" and "address" not in local["init_args"]
    assert local["init_args"]["num_gpus"] == 0 and local["client_resources"]["num_gpus"] == 0
    assert threads == local["client_resources"]["num_cpus"]
    on_cluster = replace(cfg, federation=replace(cfg.federation, ray_address="127.0.0.1:6379"))
    cluster, threads = backend_config(on_cluster, "/tmp/x")
    assert (
        cluster["init_args"]["address"] == "127.0.0.1:6379" and cluster["client_resources"]["num_cpus"] == 1
    )
    assert "_temp_dir" not in cluster["init_args"] and "num_cpus" not in cluster["init_args"]
    assert threads == 0  # the cluster's nodes set their own threads
    gpu_cluster = replace(
        on_cluster,
        base=replace(cfg.base, device="cuda"),
        federation=replace(on_cluster.federation, client_gpus=0.5),
    )
    assert backend_config(gpu_cluster, "/tmp/x")[0]["client_resources"]["num_gpus"] == 0.5


def test_lockstep_groups_by_default_on_gpus_only() -> None:
    from dataclasses import replace

    from fedpeft.config.tree import FederationConfig, RunConfig
    from fedpeft.simulation.engine import group_size

    cfg = RunConfig(federation=FederationConfig(clients=40, fraction=0.5))
    cpu = {"client_resources": {"num_cpus": 2, "num_gpus": 0.0}, "init_args": {"num_gpus": 0}}
    gpu = {"client_resources": {"num_cpus": 3, "num_gpus": 0.2}, "init_args": {"num_gpus": 1}}
    assert group_size(cfg, cpu) == 1  # one client's batch keeps CPU cores busy
    assert group_size(cfg, gpu) == 4  # 20 sampled over 5 actors
    assert group_size(replace(cfg, federation=replace(cfg.federation, clients=400)), gpu) == 8  # at most 8
    assert group_size(replace(cfg, federation=replace(cfg.federation, clients_per_actor=3)), cpu) == 3
