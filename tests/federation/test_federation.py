"""Server-side logic without Flower: sampling, reply checks, aggregation, checkpoints, resume config."""

import json
from pathlib import Path

import numpy as np
import pytest

from fedpeft.config.files import to_run_config
from fedpeft.config.tree import FederationConfig, RunConfig
from fedpeft.errors import FedpeftError
from fedpeft.federation.state import (
    ServerState,
    aggregate_round,
    check_resume_config,
    check_update,
    latest_checkpoint,
    load_checkpoint,
    sample_clients,
    save_checkpoint,
    write_global,
    write_metrics,
)
from fedpeft.model.adapter_files import AdapterDescription

FP = "f" * 64


INFO = {  # a checkpoint's "info" as the code before AdapterDescription wrote it: the format stays
    "fingerprint": FP,
    "schema": [["x.lora_A.weight", [2, 4], "float32"], ["x.lora_B.weight", [4, 2], "float32"]],
    "travel_keys": ["x.lora_B.weight"],
    "peft_config": {
        "peft_type": "LORA",
        "r": 2,
        "target_modules": ["x"],
        "base_model_name_or_path": "/b",
    },
    "adapter": {
        "kind": "lora",
        "r": 2,
        "alpha": 4.0,
        "dropout": 0.0,
        "target_modules": ["x"],
        "feedforward_modules": ["down_proj"],
        "freeze_a": True,
        "seed": 0,
    },
    "base_path": "/b",
    "quant": "nf4",
}


def _state() -> ServerState:
    arrays = {"x.lora_A.weight": np.ones((2, 4), np.float32), "x.lora_B.weight": np.zeros((4, 2), np.float32)}
    return ServerState(0, arrays, {}, AdapterDescription.from_json(INFO), [])


def _delta(value: float = 1.0) -> dict[str, np.ndarray]:
    return {"x.lora_B.weight": np.full((4, 2), value, np.float32)}


def test_sampling_depends_only_on_seed_and_round() -> None:
    a = sample_clients(10, 0.5, 2, seed=3, rnd=4)
    assert a == sample_clients(10, 0.5, 2, seed=3, rnd=4)
    assert len(a) == 5 and a == sorted(a) and len(set(a)) == 5
    assert any(sample_clients(10, 0.5, 2, seed=3, rnd=r) != a for r in range(5, 10))
    assert len(sample_clients(10, 0.01, 2, seed=0, rnd=1)) == 2  # min_clients floor
    assert sample_clients(3, 1.0, 2, seed=0, rnd=1) == [0, 1, 2]


def test_check_update_accepts_a_good_reply() -> None:
    assert check_update(_delta(), FP, 100, _state()) is None
    # a federation keyed by the source weights: another quantization of them (its own exact fingerprint) is good,
    # another source is not
    assert check_update(_delta(), "q" * 64, 100, _state(), source=FP) is None
    assert "base fingerprint" in check_update(_delta(), "q" * 64, 100, _state(), source="s" * 64)


@pytest.mark.parametrize(
    "delta,fingerprint,n,reason",
    [
        (_delta(), "e" * 64, 100, "base fingerprint"),
        ({}, FP, 100, "1 missing"),
        ({**_delta(), "y": np.zeros(1, np.float32)}, FP, 100, "1 unexpected"),
        ({"x.lora_B.weight": np.zeros((2, 4), np.float32)}, FP, 100, "is (2, 4)"),
        ({"x.lora_B.weight": np.zeros((4, 2), np.float64)}, FP, 100, "float64"),
        (_delta(np.nan), FP, 100, "non-finite"),
        (_delta(np.inf), FP, 100, "non-finite"),
        (_delta(), FP, 0, "example count"),
        (_delta(), FP, float("nan"), "example count"),
    ],
)
def test_check_update_refuses(delta, fingerprint, n, reason) -> None:
    assert reason in check_update(delta, fingerprint, n, _state())


def test_aggregate_round_moves_only_travel_keys() -> None:
    state = _state()
    new = aggregate_round(state, [_delta(1.0), _delta(4.0)], [3.0, 1.0], RunConfig())
    assert new.round == 1
    np.testing.assert_allclose(new.arrays["x.lora_B.weight"], 1.75)
    np.testing.assert_array_equal(new.arrays["x.lora_A.weight"], state.arrays["x.lora_A.weight"])


def test_checkpoint_round_trip_and_latest(tmp_path: Path) -> None:
    state = _state()
    state.history = [{"round": 0, "eval_loss": 1.0}]
    save_checkpoint(tmp_path, state, RunConfig())
    state = aggregate_round(
        state, [_delta()], [1.0], RunConfig(server_opt=RunConfig().server_opt.__class__("fedadam"))
    )
    save_checkpoint(tmp_path, state, RunConfig())
    latest = latest_checkpoint(tmp_path)
    assert latest.name == "round-001"
    loaded = load_checkpoint(latest)
    assert loaded.round == 1 and loaded.info == state.info and loaded.history == state.history
    for k in state.arrays:
        np.testing.assert_array_equal(loaded.arrays[k], state.arrays[k])
    assert sorted(loaded.opt_state) == ["m/x.lora_B.weight", "v/x.lora_B.weight"]


def test_checkpoint_info_keeps_its_format(tmp_path: Path) -> None:
    """state.json's "info" is the same JSON object as before it was typed, so checkpoints written by
    earlier code load, and this code's checkpoints load in it."""
    path = save_checkpoint(tmp_path, _state(), RunConfig())
    assert json.loads((path / "state.json").read_text())["info"] == INFO
    info = load_checkpoint(path).info
    assert info.schema == [("x.lora_A.weight", (2, 4), "float32"), ("x.lora_B.weight", (4, 2), "float32")]
    assert info.adapter.target_modules == ("x",) and info.adapter.freeze_a is True
    assert info.travel_keys == ["x.lora_B.weight"] and info.quant == "nf4"


def test_a_checkpoint_without_its_description_is_corrupt(tmp_path: Path) -> None:
    from fedpeft.atomic import write_manifest

    path = save_checkpoint(tmp_path, _state(), RunConfig())
    doc = json.loads((path / "state.json").read_text())
    del doc["info"]["travel_keys"]
    (path / "state.json").write_text(json.dumps(doc))
    write_manifest(path)  # the files verify: only the content is wrong
    with pytest.raises(FedpeftError, match="corrupt checkpoint .*travel_keys"):
        load_checkpoint(path)


def test_corrupt_checkpoint_is_reported_and_left_alone(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, _state(), RunConfig())
    weights = path / "global.safetensors"
    weights.write_bytes(weights.read_bytes()[:20])
    before = weights.read_bytes()
    with pytest.raises(FedpeftError, match="corrupt checkpoint"):
        load_checkpoint(path)
    assert weights.read_bytes() == before


def _flip_tensor_byte(path: Path) -> None:
    """Flip one bit inside the tensor data (past the safetensors header): a file that still parses."""
    data = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    data[header + (len(data) - header) // 2] ^= 0x40
    path.write_bytes(bytes(data))


def test_a_flipped_byte_in_tensor_data_is_caught_and_names_the_last_intact_round(tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    from fedpeft.federation.state import resume_round

    state = _state()
    for _ in range(3):
        save_checkpoint(tmp_path, state, RunConfig())
        state = aggregate_round(state, [_delta()], [1.0], RunConfig())
    weights = tmp_path / "checkpoints" / "round-002" / "global.safetensors"
    _flip_tensor_byte(weights)
    load_file(weights)  # still well-formed: only the manifest's sha256 tells
    files = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(FedpeftError, match=r"global.safetensors does not match its sha256; the last round that "
                       r"verifies is 1: resume from it with --resume-from 1"):  # fmt: skip
        resume_round(tmp_path)
    with pytest.raises(FedpeftError, match="corrupt checkpoint"):
        load_checkpoint(weights.parent)
    assert (
        resume_round(tmp_path, 1) == 1 and load_checkpoint(tmp_path / "checkpoints" / "round-001").round == 1
    )
    with pytest.raises(FedpeftError, match="no checkpoint of round 7"):
        resume_round(tmp_path, 7)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == files


def test_a_manifest_must_cover_every_checkpoint_file(tmp_path: Path) -> None:
    import json

    path = save_checkpoint(tmp_path, _state(), RunConfig())
    (path / "manifest.json").write_text(json.dumps({"sha256": {}}))
    _flip_tensor_byte(path / "global.safetensors")
    with pytest.raises(FedpeftError, match="manifest.json does not cover global.safetensors"):
        load_checkpoint(path)


def test_resuming_from_an_earlier_round_sets_the_later_ones_aside(tmp_path: Path) -> None:
    from fedpeft.federation.state import discard_after, resume_round

    state = _state()
    for _ in range(3):
        save_checkpoint(tmp_path, state, RunConfig())
        state = aggregate_round(state, [_delta()], [1.0], RunConfig())
    moved = discard_after(tmp_path, 0)
    assert [p.name for p in moved] == ["round-001", "round-002"] and resume_round(tmp_path) == 0
    (aside,) = (tmp_path / "checkpoints").glob("discarded-after-000-*")
    assert sorted(p.name for p in aside.iterdir()) == ["round-001", "round-002"]


def test_write_global_is_a_peft_folder_read_adapter_accepts(tmp_path: Path) -> None:
    from fedpeft.model.adapters import read_adapter

    state = _state()
    state.round = 3
    write_global(tmp_path, state)
    files = read_adapter(tmp_path / "global")
    assert files.meta["round"] == 3 and files.fingerprint == FP
    assert json.loads((tmp_path / "global" / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_metrics_are_rewritten_whole(tmp_path: Path) -> None:
    hist = [
        {
            "round": r,
            "eval_loss": 5 - r,
            "eval_ppl": 100.0 / (r + 1),
            "train_loss": None if r == 0 else 4.0,
            "eval_per_client": {"a": {"ppl": 10.0}, "b": {"ppl": 20.0}},
        }
        for r in range(3)
    ]
    write_metrics(tmp_path, hist)
    write_metrics(tmp_path, hist[:2])  # after a resume from round 1
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [0, 1]
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"


def test_resume_allows_more_rounds_but_nothing_else(tmp_path: Path) -> None:
    cfg = RunConfig()
    (tmp_path / "config.json").write_text(json.dumps(to_run_config(cfg)))
    check_resume_config(tmp_path, RunConfig(federation=FederationConfig(rounds=9)))
    check_resume_config(tmp_path, RunConfig(federation=FederationConfig(keep_checkpoints=0)))
    with pytest.raises(FedpeftError, match="federation.clients"):
        check_resume_config(tmp_path, RunConfig(federation=FederationConfig(clients=3)))
    with pytest.raises(FedpeftError, match="nothing to resume"):
        check_resume_config(tmp_path / "nope", cfg)


def test_only_the_last_checkpoints_are_kept_and_never_the_latest_lost(tmp_path: Path) -> None:
    from fedpeft.federation.state import discard_after, prune_checkpoints, resume_round, save_round

    cfg = RunConfig(federation=FederationConfig(keep_checkpoints=2))
    state = _state()
    state.history = [{"round": 0, "eval_loss": 1.0, "eval_ppl": 2.7, "eval_per_client": {}}]
    for _ in range(4):
        save_round(tmp_path, state, cfg)
        state = aggregate_round(state, [_delta()], [1.0], cfg)
    names = lambda: sorted(p.name for p in (tmp_path / "checkpoints").iterdir())  # noqa: E731
    assert names() == ["round-002", "round-003"] and resume_round(tmp_path) == 3
    discard_after(tmp_path, 2)  # a --resume-from 2: the later round is set aside, not counted or pruned
    assert prune_checkpoints(tmp_path, 1) == []
    assert names()[0].startswith("discarded-after-002") and names()[1:] == ["round-002"]
    assert prune_checkpoints(tmp_path, 0) == []  # 0 keeps all
    assert resume_round(tmp_path) == 2


def test_ray_temp_dir_stays_short_enough_for_rays_sockets(tmp_path: Path) -> None:
    from fedpeft.simulation.engine import ray_temp_dir

    deep = ray_temp_dir(tmp_path / ("x" * 60))
    assert len(str(deep)) + 62 <= 107 and not str(deep).startswith(str(tmp_path))
    deep.rmdir()
    short = Path("/tmp/fp-t")
    assert ray_temp_dir(short) == short / "ray"
    (short / "ray").rmdir()
    short.rmdir()
