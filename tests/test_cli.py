"""The command line as a user meets it: real subprocesses, exit codes, one-line errors, nothing overwritten."""

import json
import subprocess
import sys
from pathlib import Path

import pytest


def fedpeft(*args: str, cache_dir: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedpeft.cli", *args, "--cache-dir", cache_dir],
        capture_output=True,
        text=True,
        timeout=300,
    )


def assert_user_error(proc: subprocess.CompletedProcess, match: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("fedpeft: error:")]
    assert len(errors) == 1 and match in errors[0], proc.stderr


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, cache_dir: str, tiny_path: Path) -> Path:
    root = tmp_path_factory.mktemp("cli")
    users = root / "users"
    users.mkdir()
    from tests.conftest import make_text

    for i, name in enumerate(("ann", "ben")):
        (users / f"{name}.txt").write_text(make_text(i, 400))
    out = root / "adapter"
    proc = fedpeft(
        "train",
        "--model",
        "tiny",
        "--quant",
        "nf4",
        "--data",
        str(users),
        "--user",
        "ann",
        "--steps",
        "8",
        "--block-size",
        "32",
        "--out",
        str(out),
        "--no-progress",
        cache_dir=cache_dir,
    )
    assert proc.returncode == 0, proc.stderr
    assert "held-out ppl" in proc.stdout
    return out


def test_train_writes_a_peft_folder_with_metrics_and_plot(trained: Path) -> None:
    names = {p.name for p in trained.iterdir()}
    assert {
        "adapter_config.json",
        "adapter_model.safetensors",
        "fedpeft.json",
        "metrics.json",
        "loss.png",
    } <= names
    metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics["user"] == "ann" and len(metrics["train_losses"]) == 8
    assert (trained / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_export_copy_and_merge(trained: Path, tmp_path: Path, cache_dir: str) -> None:
    proc = fedpeft("export", str(trained), "--out", str(tmp_path / "copy"), cache_dir=cache_dir)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "copy" / "adapter_model.safetensors").read_bytes() == (
        trained / "adapter_model.safetensors"
    ).read_bytes()
    proc = fedpeft("export", str(trained), "--merge", "--out", str(tmp_path / "merged"), cache_dir=cache_dir)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "merged" / "config.json").is_file()
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())


def test_missing_model_path(tmp_path: Path, cache_dir: str) -> None:
    proc = fedpeft(
        "train", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), cache_dir=cache_dir
    )
    assert_user_error(proc, "model path does not exist")
    assert not (tmp_path / "o").exists()


def test_bad_user_keeps_the_existing_adapter(trained: Path, cache_dir: str) -> None:
    before = {p.name: p.read_bytes() for p in trained.iterdir()}
    proc = fedpeft(
        "train",
        "--model",
        "tiny",
        "--data",
        str(trained.parent / "users"),
        "--user",
        "nobody",
        "--out",
        str(trained),
        cache_dir=cache_dir,
    )
    assert_user_error(proc, "no user 'nobody'")
    assert {p.name: p.read_bytes() for p in trained.iterdir()} == before


def test_empty_data_folder(tmp_path: Path, cache_dir: str) -> None:
    (tmp_path / "empty").mkdir()
    proc = fedpeft(
        "train",
        "--model",
        "tiny",
        "--data",
        str(tmp_path / "empty"),
        "--out",
        str(tmp_path / "o"),
        cache_dir=cache_dir,
    )
    assert_user_error(proc, "no user data")


def test_target_modules_not_in_model(tmp_path: Path, cache_dir: str, trained: Path) -> None:
    proc = fedpeft(
        "train",
        "--model",
        "tiny",
        "--data",
        str(trained.parent / "users"),
        "--targets",
        "c_attn",
        "--out",
        str(tmp_path / "o"),
        cache_dir=cache_dir,
    )
    assert_user_error(proc, "none of the target modules")


def test_export_of_a_truncated_adapter(trained: Path, tmp_path: Path, cache_dir: str) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for p in trained.iterdir():
        (broken / p.name).write_bytes(p.read_bytes())
    (broken / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00")
    proc = fedpeft("export", str(broken), "--out", str(tmp_path / "o"), cache_dir=cache_dir)
    assert_user_error(proc, "corrupt adapter weights")
    assert not (tmp_path / "o").exists()


def test_export_onto_its_own_input(trained: Path, cache_dir: str) -> None:
    proc = fedpeft("export", str(trained), "--out", str(trained), cache_dir=cache_dir)
    assert_user_error(proc, "must differ")


def test_invalid_numbers(tmp_path: Path, cache_dir: str) -> None:
    proc = fedpeft(
        "train", "--model", "tiny", "--steps", "0", "--out", str(tmp_path / "o"), cache_dir=cache_dir
    )
    assert_user_error(proc, "--steps must be positive")


def test_help_explains_every_flag() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fedpeft.cli", "train", "--help"], capture_output=True, text=True
    )
    assert proc.returncode == 0
    for flag in ("--model", "--quant", "--adapter", "--user", "--steps", "--out", "--freeze-a", "--data"):
        assert flag in proc.stdout


def test_simulate_with_more_clients_than_users(trained: Path, tmp_path: Path, cache_dir: str) -> None:
    proc = fedpeft(
        "simulate",
        "--model",
        "tiny",
        "--data",
        str(trained.parent / "users"),
        "--clients",
        "5",
        "--out",
        str(tmp_path / "fed"),
        cache_dir=cache_dir,
    )
    assert_user_error(proc, "only 2 users")
    assert not (tmp_path / "fed" / "checkpoints").exists()


def test_simulate_resume_without_a_run(tmp_path: Path, cache_dir: str) -> None:
    proc = fedpeft("simulate", "--model", "tiny", "--resume", cache_dir=cache_dir)
    assert_user_error(proc, "--resume needs the --out")
    proc = fedpeft(
        "simulate", "--model", "tiny", "--resume", "--out", str(tmp_path / "none"), cache_dir=cache_dir
    )
    assert_user_error(proc, "nothing to resume")


def test_simulate_ffa_needs_lora(tmp_path: Path, cache_dir: str) -> None:
    proc = fedpeft(
        "simulate",
        "--adapter",
        "ia3",
        "--lora-mode",
        "ffa",
        "--out",
        str(tmp_path / "x"),
        cache_dir=cache_dir,
    )
    assert_user_error(proc, "applies to LoRA only")


@pytest.mark.parametrize(
    "flags,match",
    [
        (["--secagg-k", "0"], "--secagg-k must be at least 2"),
        (
            ["--secagg-threshold", "1"],
            "--secagg-threshold must be 4 to 5 for each secret's 5 holders",
        ),
        (["--secagg-threshold", "3"], "must be 4 to 5"),  # a bare majority: one colluder could split it
        (["--secagg-threshold", "9"], "must be 4 to 5"),
        (["--clients", "4", "--fraction", "0.5"], "needs at least 3 clients a round"),
    ],
)
def test_simulate_refuses_secagg_parameters_that_do_not_protect(
    flags: list[str], match: str, tmp_path: Path, cache_dir: str
) -> None:
    out = tmp_path / "x"
    proc = fedpeft("simulate", "--model", "tiny", "--secagg", *flags, "--out", str(out), cache_dir=cache_dir)
    assert_user_error(proc, match)
    assert not out.exists()


def test_client_refuses_a_floor_of_no_neighbours(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fedpeft.cli", "client", "--server", "127.0.0.1:9092", "--insecure"]
        + ["--data", str(tmp_path), "--min-neighbours", "0", "--store", str(tmp_path / "store")],
        capture_output=True,
        text=True,
    )
    assert_user_error(proc, "--min-neighbours must be at least 1")
