"""`flwr run .` as Flower's docs describe it: the project is a Flower app whose run config is the config
tree's defaults; a local simulation federation runs our ServerApp and ClientApp on real processes."""

import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest
import tomli_w

from fedpeft.processes import executable, free_port, process_table, stop_processes
from tests.conftest import make_text

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.simulation


def _ours(marker: str, home: str, ray_tmp: str) -> list[int]:
    """The processes this test started: Flower's detached local SuperLink, its simulation and Ray's."""
    pids = []
    for pid, proc in process_table().items():
        if pid == os.getpid():
            continue
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            environ = b""
        if marker.encode() in environ or home in proc.cmdline or ray_tmp in proc.cmdline:
            pids.append(pid)
    return pids


def test_flwr_run_dot_runs_a_federation_with_the_project_defaults_and_overrides(
    tmp_path: Path, cache_dir: str, tiny_path: Path
) -> None:
    users = tmp_path / "users"
    users.mkdir()
    for i in range(3):
        (users / f"user{i}.txt").write_text(make_text(30 + i, 400))
    home = tmp_path / "flwr-home"
    home.mkdir()
    # Flower's own connection file with its local simulation, sized to the federation
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\noptions.num-supernodes = 3\n'
    )
    out = tmp_path / "run"
    overrides = {
        "out": str(out),
        "base": {"model": "tiny", "cache_dir": cache_dir},
        "data": {"data": str(users), "block_size": 32},
        "train": {"progress": False, "lr": 5e-3},
        "federation": {"clients": 3, "fraction": 0.5, "rounds": 1, "local_steps": 2},
    }
    run_config = tmp_path / "overrides.toml"
    run_config.write_text(tomli_w.dumps(overrides))
    marker = f"FEDPEFT_TEST_RUN={uuid.uuid4().hex}"
    ray_tmp = tempfile.mkdtemp(prefix="fr", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {
        **os.environ,
        # flwr starts `flower-superlink` from PATH, as in an activated virtual environment
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_HOME": str(home),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
        "RAY_TMPDIR": ray_tmp,
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        marker.split("=")[0]: marker.split("=")[1],
    }
    try:
        proc = subprocess.run(
            [executable("flwr"), "run", str(ROOT), "local", "--run-config", str(run_config), "--stream"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=400,
        )
        status = out / "status.json"
        assert status.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
        assert '"finished"' in status.read_text(), status.read_text()
        import json

        history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [h["round"] for h in history] == [0, 1]
        assert len(history[0]["eval_per_client"]) == 3 and len(history[1]["sampled"]) == 2
        assert (out / "global" / "adapter_model.safetensors").is_file() and (out / "plot.png").is_file()
    finally:
        stop_processes(_ours(marker, str(home), ray_tmp), timeout=15)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert _ours(marker, str(home), ray_tmp) == []
