"""fedpeft certs | server | client as a user meets them: one-line errors before anything starts."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
from flwr.app import ConfigRecord

from fedpeft.data.users import _read_folder, load_device_user
from fedpeft.deploy.certs import make_certs
from fedpeft.device.tasks import check_base
from fedpeft.errors import FedpeftError
from tests.test_cli import assert_user_error


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedpeft.cli", *args], capture_output=True, text=True, timeout=120
    )


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    return make_certs(tmp_path / "certs", ["127.0.0.1"], ["alice"]).root


def test_certs_prints_what_to_run_next(tmp_path: Path) -> None:
    proc = run("certs", "--out", str(tmp_path / "c"), "--clients", "alice,bob", "--san", "10.1.2.3")
    assert proc.returncode == 0, proc.stderr
    assert "fedpeft server --certs" in proc.stdout and "--key bob.key" in proc.stdout
    assert "flwr supernode register" in proc.stdout and "10.1.2.3" in proc.stdout


@pytest.mark.parametrize(
    "args,match",
    [
        (["--server", "nohost"], "--server must be HOST:PORT"),
        (["--server", "127.0.0.1:9092"], "TLS needs --root-cert"),
        (["--server", "127.0.0.1:9092", "--root-cert", "/nonexistent/ca.pem"], "does not exist"),
    ],
)
def test_client_refuses_bad_connection_flags(tmp_path: Path, args: list[str], match: str) -> None:
    (tmp_path / "me.txt").write_text("some text " * 50)
    assert_user_error(
        run("client", *args, "--data", str(tmp_path / "me.txt"), "--store", str(tmp_path / "s")), match
    )


def test_client_refuses_a_bad_key_and_missing_data(tmp_path: Path, certs: Path) -> None:
    (tmp_path / "me.txt").write_text("some text " * 50)
    common = [
        "--server",
        "127.0.0.1:9092",
        "--root-cert",
        str(certs / "ca.pem"),
        "--store",
        str(tmp_path / "s"),
    ]
    # the server's TLS key is PEM, not the OpenSSH node key Flower expects
    proc = run("client", *common, "--data", str(tmp_path / "me.txt"), "--key", str(certs / "server.key"))
    assert_user_error(proc, "not an OpenSSH private key")
    assert_user_error(run("client", *common, "--data", str(tmp_path / "nope")), "data path does not exist")


def test_server_refuses_unsafe_or_incomplete_setups(tmp_path: Path, certs: Path) -> None:
    out = ["--model", "tiny", "--out", str(tmp_path / "srv")]
    assert_user_error(run("server", *out), "TLS needs --certs")
    assert_user_error(run("server", *out, "--insecure"), "node authentication needs TLS")
    empty = make_certs(tmp_path / "empty", ["127.0.0.1"], []).root
    assert_user_error(run("server", *out, "--certs", str(empty)), "no client public key to register")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        assert_user_error(run("server", *out, "--certs", str(certs), "--port", port), "already in use")
    assert not (tmp_path / "srv" / "superlink").exists()  # nothing started


def test_a_device_refuses_another_base_before_training() -> None:
    check_base(ConfigRecord({"fingerprint": "a" * 64}), "a" * 64)
    check_base(ConfigRecord({}), "a" * 64)  # registration: nothing to compare yet
    with pytest.raises(FedpeftError, match="differs from the federation's"):
        check_base(ConfigRecord({"fingerprint": "b" * 64}), "a" * 64)
    # a federation keyed by the source weights takes every quantization of them; another source is refused
    check_base(ConfigRecord({"fingerprint": "s" * 64}), "a" * 64, "s" * 64)
    with pytest.raises(FedpeftError, match="differs from the federation's"):
        check_base(ConfigRecord({"fingerprint": "t" * 64}), "a" * 64, "s" * 64)


def test_device_text_reads_as_in_a_corpus_folder(tmp_path: Path) -> None:
    (tmp_path / "corpus" / "carol").mkdir(parents=True)
    (tmp_path / "corpus" / "carol" / "b.txt").write_text("second part")
    (tmp_path / "corpus" / "carol" / "a.txt").write_text("first part")
    (tmp_path / "corpus" / "dave.txt").write_text("dave's words")
    corpus = {u.user: u.text for u in _read_folder(tmp_path / "corpus")}
    assert load_device_user(str(tmp_path / "corpus" / "carol")).text == corpus["carol"]
    assert load_device_user(str(tmp_path / "corpus" / "dave.txt")).user == "dave"
    assert load_device_user(str(tmp_path / "corpus" / "dave.txt"), name="Dave S").user == "dave-s"
    (tmp_path / "empty").mkdir()
    with pytest.raises(FedpeftError, match="no text"):
        load_device_user(str(tmp_path / "empty"))


def test_server_and_cheap_client_stages_never_import_torch() -> None:
    """The server never loads a model, and a SuperNode starts a process per message: stages that need no
    model must not pay for importing torch."""
    code = (
        "import sys, client.app, server.app, fedpeft.federation.secure_round, fedpeft.deploy.server, fedpeft.federation.state;"
        # the server's side of task metrics: reading a client's counts, pooling, the round line
        "from fedpeft.federation.task_eval import client_entry; from fedpeft.federation.evaluation import EvalResult, eval_metrics, add_base;"
        "from fedpeft.federation.rounds import round_line;"
        "e = client_entry({'task_n': 2.0, 'task_correct': 1.0, 'task_tp_0': 1.0, 'task_fp_1': 1.0, 'task_fn_0': 1.0});"
        "m = {'round': 0, **eval_metrics([EvalResult('a', 1.0, 4, task=e)])}; add_base(m, [m]); round_line(m);"
        "print(sorted(m for m in ('torch', 'transformers', 'peft', 'ray') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "[]", proc.stderr


def test_a_devices_install_is_the_core_and_pulls_no_ray_plotting_or_server_tools() -> None:
    """`pip install fedpeft` on a device: what it asks for itself. (Flower brings FastAPI, uvicorn and
    SQLAlchemy whatever we ask: its SuperNode serves its Runtime API with them.) That the device path runs
    without these: tests/device/test_worker.py."""
    import re
    from importlib.metadata import requires

    core = {re.split(r"[ ;<>=!~\[]", r)[0].lower() for r in requires("fedpeft") or [] if "extra ==" not in r}
    assert "flwr" in core and "torch" in core
    assert not core & {"ray", "matplotlib", "seaborn", "flwr-datasets", "dp-accounting", "fastapi", "uvicorn"}
    ray = [r for r in requires("fedpeft") or [] if "simulation" in r or r.startswith("ray")]
    assert ray and all('extra == "simulation"' in r for r in ray)
