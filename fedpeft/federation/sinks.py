"""Where a round's metrics go, each a `Sink`: metrics.jsonl and plot.png (rewritten whole from the history,
so a resumed run never repeats or loses a round), and the trackers users already run, when --log-to names
them: TensorBoard event files (RUN/tb) and an MLflow local file store (RUN/mlruns). The console's sink is
fedpeft.federation.rounds.ConsoleSink, under the rounds bar. save_round (fedpeft.federation.state) hands
each round to `record`, so the round loop knows none of this.

The trackers are an optional extra (`pip install "fedpeft[tracking]"`) and write local files only: no
account, no server, no network. tensorboardX and mlflow are imported only when --log-to asks for them:
each takes seconds to import (tensorboardX imports torch where it is installed), which the server's
start-up, and the fedpeft.federation.state import that the server and the tests make, must not pay.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from fedpeft.atomic import atomic_write_bytes, atomic_write_json
from fedpeft.config.files import to_run_config
from fedpeft.config.tree import RunConfig
from fedpeft.errors import FedpeftError
from fedpeft.federation.metrics import RoundMetrics, as_history

log = logging.getLogger("fedpeft")

# the module each tracker needs: tensorboardX writes TensorBoard's event files without TensorFlow, and
# mlflow-skinny is MLflow's client without its server
TRACKER_MODULES = {"tensorboard": "tensorboardX", "mlflow": "mlflow"}
MLFLOW_RUN_FILE = "mlflow-run.json"  # the federation's MLflow run, so that a resumed run logs into it
MLFLOW_EXPERIMENT = "fedpeft"
MLFLOW_MAX_PARAMS = 100  # MLflow's limit on the parameters of one log_batch


class Sink(Protocol):
    """Takes each round's metrics as the round ends; `close` when the run (or the round's save) is done."""

    def round(self, metrics: RoundMetrics) -> None: ...

    def close(self) -> None: ...


class JsonlSink:
    """metrics.jsonl: one JSON object a round, keys sorted (unchanged: old runs' lines stay byte-identical)."""

    def __init__(self, run_dir: Path, earlier: Sequence[RoundMetrics] = ()) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.lines = [_line(m) for m in earlier]

    def round(self, metrics: RoundMetrics) -> None:
        self.lines.append(_line(metrics))
        self.write()

    def write(self) -> None:
        atomic_write_bytes(self.path, "".join(self.lines).encode())

    def close(self) -> None:
        pass


def _line(m: RoundMetrics) -> str:
    return json.dumps(m.to_json(), sort_keys=True) + "\n"


class PlotSink:
    """plot.png (fedpeft.federation.report.federation_png), drawn anew from the whole history."""

    def __init__(self, run_dir: Path, earlier: Sequence[RoundMetrics] = ()) -> None:
        self.path, self.history = Path(run_dir) / "plot.png", list(earlier)
        self.missing = False

    def round(self, metrics: RoundMetrics) -> None:
        from fedpeft.federation.report import federation_png  # matplotlib: off the server's start-up path

        self.history.append(metrics)
        if self.missing:
            return
        try:
            atomic_write_bytes(self.path, federation_png(self.history))
        except FedpeftError as e:  # an install without the plot extra: metrics.jsonl has every figure
            self.missing = True
            log.warning("plot.png is not drawn: %s", e)

    def close(self) -> None:
        pass


class TensorBoardSink:
    """TensorBoard event files in RUN/tb: each round's figures (RoundMetrics.scalars: "eval/ppl",
    "train/loss", "bytes/up", "dp/epsilon", "task/accuracy"...) at step = round. A file a round, closed
    with it, so a run killed between rounds loses nothing; each starts with a purge at its round
    (TensorBoard then drops what earlier files logged at that step or later), so a run resumed from an
    earlier round replaces the rounds it trains again instead of drawing them twice."""

    def __init__(self, run_dir: Path) -> None:
        self.dir = str(Path(run_dir) / "tb")

    def round(self, metrics: RoundMetrics) -> None:
        from tensorboardX import SummaryWriter  # only when asked for: it imports torch where installed

        rnd = metrics.round
        # TensorBoard reads a folder's event files in name order, and tensorboardX names them by the second:
        # the suffix keeps rounds written within one second (a resume included) in the order written
        suffix = f".{time.time_ns()}.round-{rnd:03d}"
        writer = SummaryWriter(self.dir, purge_step=rnd, filename_suffix=suffix)
        try:
            for name, value in metrics.scalars().items():
                writer.add_scalar(name, value, rnd)
        finally:
            writer.close()

    def close(self) -> None:
        pass


class MlflowSink:
    """One MLflow run per federation in a local file store (RUN/mlruns, experiment "fedpeft"): the
    configuration as its parameters, each round's figures at step = round, FINISHED after the last round.
    Its id is kept in RUN/mlflow-run.json, so a resumed run logs into the same run."""

    def __init__(self, run_dir: Path, cfg: RunConfig) -> None:
        self.run_dir, self.cfg = Path(run_dir), cfg

    def round(self, metrics: RoundMetrics) -> None:
        from mlflow.entities import Metric  # mlflow: see mlflow_client

        client = mlflow_client(self.run_dir)
        run_id = self._run_id(client)
        finished = metrics.round >= self.cfg.federation.rounds
        if not finished and client.get_run(run_id).info.status != "RUNNING":  # resumed with more rounds
            client.update_run(run_id, status="RUNNING")
        now = int(time.time() * 1000)
        figures = [Metric(k, v, now, metrics.round) for k, v in metrics.scalars().items()]
        client.log_batch(run_id, metrics=figures)
        if finished:
            client.set_terminated(run_id, "FINISHED")

    def _run_id(self, client: Any) -> str:
        path = self.run_dir / MLFLOW_RUN_FILE
        if path.is_file():
            run_id = str(json.loads(path.read_text())["run_id"])
            try:
                client.get_run(run_id)
                return run_id
            # its store was deleted or moved: a new run, not a failed round (mlflow's file store raises a
            # bare Exception for a missing root: mlflow/store/tracking/file_store.py, _check_root_dir)
            except Exception:
                log.warning("MLflow run %s is gone from %s; logging into a new one", run_id, self.run_dir)
                (self.run_dir / "mlruns" / ".trash").mkdir(
                    parents=True, exist_ok=True
                )  # what its store expects
        from mlflow.entities import Param  # mlflow: see mlflow_client

        experiment = client.get_experiment_by_name(MLFLOW_EXPERIMENT)
        eid = experiment.experiment_id if experiment else client.create_experiment(MLFLOW_EXPERIMENT)
        run_id = client.create_run(eid, run_name=self.run_dir.resolve().name).info.run_id
        params = [
            Param(k, v if isinstance(v, str) else json.dumps(v)) for k, v in to_run_config(self.cfg).items()
        ]
        for i in range(0, len(params), MLFLOW_MAX_PARAMS):
            client.log_batch(run_id, params=params[i : i + MLFLOW_MAX_PARAMS])
        atomic_write_json(path, {"run_id": run_id, "experiment_id": eid})
        return run_id

    def close(self) -> None:
        pass


def mlflow_client(run_dir: Path) -> Any:
    """An MLflow client of RUN/mlruns alone: a file store needs no server, and MLflow's telemetry is off
    unless the user turned it on. MLflow 3 refuses its file store unless told it is wanted."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient  # only when asked for: mlflow takes seconds to import

    uri = (Path(run_dir).resolve() / "mlruns").as_uri()
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def trackers(cfg: RunConfig) -> tuple[str, ...]:
    """The trackers --log-to names."""
    return tuple(getattr(cfg.federation, "log_to", ()))


def check_trackers(cfg: RunConfig) -> None:
    """Before a federation starts: each tracker --log-to names has its package, or a one-line error."""
    missing = [n for n in trackers(cfg) if importlib.util.find_spec(TRACKER_MODULES[n]) is None]
    if missing:
        needs = " and ".join(TRACKER_MODULES[n] for n in missing)
        raise FedpeftError(f'--log-to {",".join(missing)} needs {needs}: pip install "fedpeft[tracking]"')


def open_trackers(run_dir: Path, cfg: RunConfig) -> list[Sink]:
    check_trackers(cfg)
    made = {"tensorboard": lambda: TensorBoardSink(run_dir), "mlflow": lambda: MlflowSink(run_dir, cfg)}
    return [made[name]() for name in trackers(cfg)]


def record(
    run_dir: Path, history: Sequence[RoundMetrics | Mapping[str, Any]], cfg: RunConfig | None = None
) -> None:
    """After each round: metrics.jsonl and plot.png from the whole history, and its latest round to each
    tracker `cfg` names (none without a cfg). An empty history writes an empty metrics.jsonl."""
    rows = as_history(history)
    if not rows:
        JsonlSink(run_dir).write()
        return
    sinks: list[Sink] = [JsonlSink(run_dir, rows[:-1]), PlotSink(run_dir, rows[:-1])]
    try:
        for sink in sinks:
            sink.round(rows[-1])
    finally:
        for sink in sinks:
            sink.close()
    # a tracker is a copy of metrics.jsonl: its failure (a store deleted under a running federation, a
    # full disk) costs that round's copy and a warning, never the federation
    for tracker in open_trackers(run_dir, cfg) if cfg is not None else []:
        try:
            tracker.round(rows[-1])
            tracker.close()
        except Exception as e:
            log.warning("round %d was not logged to %s: %s", rows[-1].round, type(tracker).__name__, e)
