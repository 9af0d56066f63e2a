"""The resident device worker as Flower's task executor: what it runs (our ClientApp, in its own process,
the base loaded once), what it refuses (another app or version), and how a restarted worker answers the
task its predecessor held. The whole loop against a real SuperNode and SuperLink is in
tests/deploy/test_deployment.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedpeft.config.node import DeviceConfig
from fedpeft.device.worker import IN_FLIGHT_FILE, SECRET_FILE, Executor, foreign
from fedpeft.errors import FedpeftError
from tests.conftest import make_text

ROOT = Path(__file__).resolve().parents[2]

# What a device's install (the core: pyproject.toml) leaves out, and our serving stack: the device path must
# never import them. The script below refuses them outright.
LEFT_OUT = ("ray", "matplotlib", "seaborn", "flwr_datasets", "dp_accounting", "scipy", "fedpeft.serve")

# Runs in a fresh interpreter, as the worker runs tasks: two rounds through the real ClientApp on a device's
# node config, then reports what it saw.
TASKS = r"""
import json, sys

for name in json.loads(sys.argv[2]):  # absent, as in an install without them: importing one fails
    sys.modules[name] = None
import fedpeft.deploy.client, fedpeft.device.worker  # the device's own processes, as they start
from flwr.app import ConfigRecord, Context, Message, RecordDict
from fedpeft.flower.client_app import app
from fedpeft.federation.wire import arrays_to_record, record_to_arrays
from fedpeft.config.tree import RunConfig, AdapterConfig, DataConfig, TrainConfig, FederationConfig
from fedpeft.config.files import to_run_config
from flwr.supercore.task_identity import TaskIdentity

TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1  # as pull_task_input sets them
light = "torch" not in sys.modules  # the ClientApp's own import stays light: cheap stages need no torch
node = json.loads(sys.argv[1])
cfg = RunConfig(adapter=AdapterConfig(r=4), data=DataConfig(block_size=32),
                train=TrainConfig(batch_size=2), federation=FederationConfig(local_steps=2, secagg=True))
config = ConfigRecord(to_run_config(cfg))
context = Context(1, 1, node, RecordDict(), {})

def ask(kind, task, arrays=None):
    content = RecordDict({"config": config, "task": ConfigRecord(task)})
    if arrays is not None:
        content["arrays"] = arrays_to_record(arrays)
    reply = app(Message(content, dst_node_id=1, message_type=kind), context)
    assert not reply.has_error(), reply.error.reason
    return reply.content

first = ask("query", {"with-init": True})
fingerprint = first["info"]["fingerprint"]
glob = record_to_arrays(first["init"])
out = {"rounds": [], "light": light}
for rnd in (1, 2):
    reply = ask("train", {"round": rnd, "client": 0, "fingerprint": fingerprint}, glob)
    delta = record_to_arrays(reply["delta"])
    glob = {k: glob[k] + delta[k] for k in delta} | {k: v for k, v in glob.items() if k not in delta}
    ev = ask("evaluate", {"round": rnd, "client": 0, "fingerprint": fingerprint}, glob)
    out["rounds"].append({**dict(reply["metrics"]), "eval_loss": ev["metrics"]["eval_loss"]})
print(json.dumps(out))
"""


def test_the_clientapp_runs_a_devices_tasks_in_one_process_with_the_base_loaded_once_and_a_lean_install(
    tmp_path: Path, tiny_path: Path, cache_dir: str
) -> None:
    data = tmp_path / "alice.txt"
    data.write_text(make_text(21, 600))
    store = tmp_path / "store"
    node = DeviceConfig(
        data_path=str(data),
        name="alice",
        model=str(tiny_path),
        cache_dir=cache_dir,
        store=str(store),
        personal_dir=str(store / "personal"),
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", TASKS, json.dumps(node.to_node_config()), json.dumps(LEFT_OUT)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["light"] is True
    r1, r2 = out["rounds"]
    assert r1["base_loads"] == r2["base_loads"] == 1
    assert r1["load_seconds"] > 0 and r2["load_seconds"] < 0.5  # the second round found the base resident
    assert r2["eval_loss"] < r1["eval_loss"] or np.isclose(r2["eval_loss"], r1["eval_loss"], rtol=0.05)
    assert r1["peak_rss_mib"] > 100  # this process holds torch and the base


def test_a_run_of_another_app_or_version_is_refused() -> None:
    from importlib.metadata import version

    mine = version("fedpeft")
    assert foreign("fedpeft/fedpeft", mine) is None
    for fab_id, fab_version in (("fedpeft/fedpeft", mine + ".post1"), ("evil/fedpeft", mine), ("", "")):
        reason = foreign(fab_id, fab_version)
        assert reason is not None and reason.startswith("refused:") and mine in reason


def test_the_publisher_the_worker_expects_is_the_apps() -> None:
    import tomllib

    from fedpeft.device.worker import PUBLISHER

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert (
        project["tool"]["flwr"]["app"]["publisher"] == PUBLISHER and project["project"]["name"] == "fedpeft"
    )


def test_a_worker_without_its_secret_is_refused_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(FedpeftError, match=SECRET_FILE):
        Executor(tmp_path, "127.0.0.1:1")


def test_a_restarted_worker_drops_a_record_it_cannot_answer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A record the previous worker left: unreadable, or its SuperNode gone (its task gone with it). Either
    way the record goes and the worker carries on."""
    (tmp_path / SECRET_FILE).write_bytes(b"s" * 32)
    executor = Executor(tmp_path, "127.0.0.1:9")  # nothing listens there
    (tmp_path / IN_FLIGHT_FILE).write_text("{not json")
    executor.answer_orphan()
    assert not (tmp_path / IN_FLIGHT_FILE).exists()

    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_task_id", "_run_id", "_node_id"):  # as a task's pull sets them
        monkeypatch.setattr(TaskIdentity, name, 1)
    message = Message(RecordDict({"task": ConfigRecord({"round": 1})}), dst_node_id=7, message_type="train")
    message.metadata.__dict__["_message_id"] = message.object_id
    executor._remember("token", message)
    assert json.loads((tmp_path / IN_FLIGHT_FILE).read_text())["token"] == "token"
    executor.answer_orphan()
    assert not (tmp_path / IN_FLIGHT_FILE).exists()
