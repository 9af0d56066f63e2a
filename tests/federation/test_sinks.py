"""Sinks: the trackers --log-to names get each round's figures in the run folder (TensorBoard event files,
an MLflow file store), read back with their own formats; no network; a missing package is one line."""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fedpeft.config.tree import FederationConfig, RunConfig
from fedpeft.errors import FedpeftError
from fedpeft.federation.sinks import MLFLOW_RUN_FILE, check_trackers, mlflow_client, record

LINES = Path(__file__).with_name("metrics_lines.jsonl")


def _history(rounds: int = 3) -> list[dict[str, Any]]:
    """A federation's history shaped as the loop builds it: round 0, then trained rounds under DP."""
    line = json.loads(LINES.read_text().splitlines()[-1])
    zero = {**json.loads(LINES.read_text().splitlines()[0]), "round": 0}
    return [zero] + [
        {**line, "round": r, "eval_ppl": 30.0 - r, "train_loss": 4.0 - r / 10, "bytes_up": 1000 * r,
         "dp": {"mode": "central", "epsilon": 0.5 * r, "delta": 1e-5}}
        for r in range(1, rounds + 1)
    ]  # fmt: skip


def _cfg(*trackers: str, rounds: int = 3) -> RunConfig:
    return RunConfig(federation=FederationConfig(rounds=rounds, log_to=trackers))


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every attempt to open a connection, refused and kept: a tracker must not need one. (And no
    plot.png: drawing one a round is test_report's, and costs a second here each time.)"""
    from fedpeft.federation.sinks import PlotSink

    monkeypatch.setattr(PlotSink, "round", lambda self, metrics: None)
    tried: list[Any] = []

    def refuse(self: socket.socket, address: Any) -> None:
        tried.append(address)
        raise OSError("no network in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return tried


def _scalars(tb: Path) -> dict[str, dict[int, float]]:
    """Read TensorBoard event files as TensorBoard does: TFRecords of Event protos, in file order; a
    session START at step s drops what earlier files logged at step s or later."""
    from tensorboardX.proto.event_pb2 import Event, SessionLog

    out: dict[str, dict[int, float]] = {}
    for path in sorted(tb.glob("events.out.tfevents.*")):
        data, at = path.read_bytes(), 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at : at + 8])
            event = Event.FromString(data[at + 12 : at + 12 + length])
            at += 12 + length + 4  # length, its CRC, the record, its CRC
            if event.HasField("session_log") and event.session_log.status == SessionLog.START:
                for steps in out.values():
                    for step in [s for s in steps if s >= event.step]:
                        del steps[step]
            for value in event.summary.value:
                out.setdefault(value.tag, {})[event.step] = value.simple_value
    return out


def test_tensorboard_gets_each_rounds_figures_and_a_resume_replaces_its_rounds(
    tmp_path: Path, no_network: list[Any]
) -> None:
    pytest.importorskip("tensorboardX")
    history, cfg = _history(), _cfg("tensorboard")
    for r in range(len(history)):
        record(tmp_path, history[: r + 1], cfg)
    scalars = _scalars(tmp_path / "tb")
    assert scalars["eval/ppl"] == {0: pytest.approx(history[0]["eval_ppl"]), 1: 29.0, 2: 28.0, 3: 27.0}
    assert scalars["train/loss"] == {1: pytest.approx(3.9), 2: pytest.approx(3.8), 3: pytest.approx(3.7)}
    assert scalars["dp/epsilon"] == {1: 0.5, 2: 1.0, 3: 1.5} and scalars["bytes/up"][3] == 3000.0
    assert scalars["task/accuracy"][3] == pytest.approx(history[3]["task"]["accuracy"])
    assert len(list((tmp_path / "tb").iterdir())) == 4  # a file a round, closed with it
    # resumed from round 1's checkpoint: rounds 2 and 3 train again, with other figures
    again = [*history[:2], {**history[2], "eval_ppl": 25.0}]
    record(tmp_path, again, cfg)
    assert _scalars(tmp_path / "tb")["eval/ppl"] == {
        0: pytest.approx(history[0]["eval_ppl"]),
        1: 29.0,
        2: 25.0,
    }
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 3 and not no_network


def test_mlflow_keeps_one_run_per_federation_in_a_local_file_store(
    tmp_path: Path, no_network: list[Any]
) -> None:
    pytest.importorskip("mlflow")
    run_dir = tmp_path / "a run"  # a space in the path: the store's URI is quoted
    history, cfg = _history(), _cfg("mlflow", rounds=3)
    for r in range(3):  # interrupted after round 2
        record(run_dir, history[: r + 1], cfg)
    run_id = json.loads((run_dir / MLFLOW_RUN_FILE).read_text())["run_id"]
    client = mlflow_client(run_dir)
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING" and run.info.run_name == "a run"
    assert run.data.params["federation.rounds"] == "3" and run.data.params["federation.log_to"] == "mlflow"
    assert len(run.data.params) > 80  # the whole configuration, as config.json has it
    record(run_dir, history, cfg)  # resumed: the last round goes to the same run, which then finishes
    runs = client.search_runs([run.info.experiment_id])
    assert [r.info.run_id for r in runs] == [run_id] and client.get_run(run_id).info.status == "FINISHED"
    ppl = {m.step: m.value for m in client.get_metric_history(run_id, "eval/ppl")}
    assert ppl == {0: pytest.approx(history[0]["eval_ppl"]), 1: 29.0, 2: 28.0, 3: 27.0}
    epsilon = {m.step: m.value for m in client.get_metric_history(run_id, "dp/epsilon")}
    assert epsilon == {1: 0.5, 2: 1.0, 3: 1.5} and (run_dir / "mlruns").is_dir()
    assert not no_network


def test_a_deleted_mlflow_store_or_a_failing_tracker_costs_a_warning_not_the_federation(
    tmp_path: Path, no_network: list[Any], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    pytest.importorskip("mlflow")
    import shutil

    from fedpeft.federation import sinks

    history, cfg = _history(), _cfg("mlflow", rounds=3)
    record(tmp_path, history[:2], cfg)
    old = json.loads((tmp_path / MLFLOW_RUN_FILE).read_text())["run_id"]
    shutil.rmtree(tmp_path / "mlruns")  # deleted under a running federation
    record(tmp_path, history[:3], cfg)
    new = json.loads((tmp_path / MLFLOW_RUN_FILE).read_text())["run_id"]
    assert new != old and "is gone" in caplog.text
    client = mlflow_client(tmp_path)
    assert [m.step for m in client.get_metric_history(new, "eval/ppl")] == [2]

    def broken(self: Any, metrics: Any) -> None:
        raise OSError("No space left on device")

    monkeypatch.setattr(sinks.MlflowSink, "round", broken)
    record(tmp_path, history, cfg)  # no exception: metrics.jsonl is the record, a tracker its copy
    assert "was not logged to MlflowSink: No space left on device" in caplog.text
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == len(history)
    assert not no_network


def test_a_tracker_without_its_package_is_one_line_before_anything_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    from fedpeft.federation.state import plan_run

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "mlflow" else find_spec(n, *a)
    )
    check_trackers(_cfg())  # none asked for: nothing needed
    with pytest.raises(FedpeftError) as e:
        plan_run(tmp_path / "run", _cfg("tensorboard", "mlflow"), resume=False, resume_from=None)
    assert str(e.value) == '--log-to mlflow needs mlflow: pip install "fedpeft[tracking]"'
    assert not (tmp_path / "run").exists()
    with pytest.raises(FedpeftError, match="fedpeft\\[tracking\\]"):
        record(tmp_path, _history(0), _cfg("mlflow"))  # a ServerApp in another process says the same


def test_the_sinks_import_no_tracker_plotter_or_torch() -> None:
    """The server imports the sinks with fedpeft.federation.state: the trackers are imported only when
    --log-to names them, matplotlib only when a plot is drawn."""
    code = (
        "import sys, fedpeft.federation.state, fedpeft.federation.sinks, fedpeft.federation.rounds;"
        "print(sorted(m for m in ('torch', 'tensorboardX', 'mlflow', 'matplotlib') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "[]", proc.stderr


def test_without_the_plot_extra_the_metrics_are_written_and_the_plot_is_skipped_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A device's install (the core) has no matplotlib; a server installed that way still records."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # absent: importing it fails
    with caplog.at_level("WARNING", logger="fedpeft"):
        record(tmp_path, _history(2))
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3
    assert not (tmp_path / "plot.png").exists()
    (line,) = [r.getMessage() for r in caplog.records]
    assert "plot.png is not drawn" in line and "pip install 'fedpeft[plot]'" in line
