"""The compute dtype: chosen per machine from a cached measurement, never part of the fingerprint, and the
same loss in fp32 and bf16 on one stored base."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedpeft.config.tree import AdapterConfig, BaseConfig, DataConfig, TrainConfig
from fedpeft.data.blocks import load_user_data
from fedpeft.model import precision
from fedpeft.model.adapters import adapter_state, inject
from fedpeft.model.base import load_base
from fedpeft.training.local import evaluate, train
from tests.grid import DeviceGrid

SHAPE = (576, 1536)


class FakeCPU:
    """A CPU whose capability and matmul speeds the test sets; counts the measurements taken."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, capability: str, fp32: float, bf16: float) -> None:
        self.capability, self.speeds, self.measured = capability, {"fp32": fp32, "bf16": bf16}, []
        self.version = "2.13.0+cpu"
        monkeypatch.setattr(precision, "cpu_capability", lambda: self.capability)
        monkeypatch.setattr(precision, "torch_version", lambda: self.version)
        monkeypatch.setattr(precision, "measure_matmul", self.measure)

    def measure(self, dtype: str, rows: int, k: int, n: int, seconds: float = 0.0) -> float:
        self.measured.append((dtype, k, n))
        return self.speeds[dtype]


def test_auto_on_a_cpu_without_fast_bf16_computes_in_fp32(monkeypatch, tmp_path: Path) -> None:
    cpu = FakeCPU(monkeypatch, "AVX2", fp32=73.8, bf16=1.2)  # the AVX2-only EPYC
    chosen = precision.choose("auto", "bf16", "cpu", SHAPE, tmp_path / "speeds.json")
    assert chosen.dtype == "fp32" and "AVX2" in chosen.why and chosen.gflops == cpu.speeds
    assert sorted(d for d, *_ in cpu.measured) == ["bf16", "fp32"]
    assert {(k, n) for _, k, n in cpu.measured} == {SHAPE}  # the model's own widest projection


def test_auto_takes_bf16_only_when_it_is_clearly_faster(monkeypatch, tmp_path: Path) -> None:
    cpu = FakeCPU(monkeypatch, "AVX512", fp32=100.0, bf16=300.0)
    assert precision.choose("auto", "nf4", "cpu", SHAPE, tmp_path / "a.json").dtype == "bf16"
    cpu.speeds = {"fp32": 100.0, "bf16": 110.0}  # within the margin: fp32 computes the weights exactly
    assert precision.choose("auto", "nf4", "cpu", SHAPE, tmp_path / "b.json").dtype == "fp32"


def test_speeds_are_cached_per_machine_and_measured_again_when_torch_or_the_cpu_changes(
    monkeypatch, tmp_path: Path
) -> None:
    cache = tmp_path / "speeds.json"
    cpu = FakeCPU(monkeypatch, "AVX2", fp32=70.0, bf16=1.0)
    precision.choose("auto", "bf16", "cpu", SHAPE, cache)
    assert len(cpu.measured) == 2
    cpu.speeds = {"fp32": 1.0, "bf16": 70.0}  # not measured again: the cache answers
    assert precision.choose("auto", "bf16", "cpu", SHAPE, cache).dtype == "fp32"
    assert len(cpu.measured) == 2
    cpu.version = "2.14.0+cpu"  # a new torch: measured again, and the new speeds decide
    assert precision.choose("auto", "bf16", "cpu", SHAPE, cache).dtype == "bf16"
    assert len(cpu.measured) == 4
    cpu.capability = "AVX512"  # another CPU
    precision.choose("auto", "bf16", "cpu", SHAPE, cache)
    assert len(cpu.measured) == 6
    entries = json.loads(cache.read_text())["entries"]
    assert len(entries) == 3 and all(k.endswith("576x1536") for k in entries)
    precision.choose("auto", "bf16", "cpu", (64, 128), cache)  # another model's shape
    assert len(cpu.measured) == 8


def test_a_broken_or_unwritable_cache_still_chooses(monkeypatch, tmp_path: Path) -> None:
    cpu = FakeCPU(monkeypatch, "AVX2", fp32=70.0, bf16=1.0)
    broken = tmp_path / "speeds.json"
    broken.write_text("{not json")
    assert precision.choose("auto", "bf16", "cpu", SHAPE, broken).dtype == "fp32"
    assert json.loads(broken.read_text())["version"] == precision.CACHE_VERSION  # rewritten whole
    missing_parent = tmp_path / "file"
    missing_parent.write_text("")
    assert precision.choose("auto", "bf16", "cpu", SHAPE, missing_parent / "speeds.json").dtype == "fp32"
    assert len(cpu.measured) == 4


def test_explicit_choices_and_the_fp32_reference_are_not_measured(monkeypatch, tmp_path: Path) -> None:
    cpu = FakeCPU(monkeypatch, "AVX2", fp32=70.0, bf16=1.0)
    assert precision.choose("bf16", "bf16", "cpu", SHAPE, tmp_path / "s.json").dtype == "bf16"
    assert precision.choose("fp16", "nf4", "cpu", SHAPE, tmp_path / "s.json").why == "--compute-dtype fp16"
    assert precision.choose("auto", "none", "cpu", SHAPE, tmp_path / "s.json").dtype == "fp32"
    assert cpu.measured == []
    with pytest.raises(ValueError):
        precision.choose("fp64", "bf16", "cpu", SHAPE)


def test_a_budget_without_room_for_fp32_weights_keeps_bf16(monkeypatch, tmp_path: Path) -> None:
    FakeCPU(monkeypatch, "AVX2", fp32=70.0, bf16=1.0)
    chosen = precision.choose("auto", "bf16", "cpu", SHAPE, tmp_path / "s.json", fp32_fits=False)
    assert chosen.dtype == "bf16" and "--max-memory" in chosen.why


def test_a_real_measurement_is_positive_and_cached(tmp_path: Path) -> None:
    cache = tmp_path / "speeds.json"
    speeds = precision.cpu_speeds(64, 128, cache)
    assert set(speeds) == {"fp32", "bf16"} and min(speeds.values()) > 0
    assert precision.cpu_speeds(64, 128, cache) == speeds


def _tiny(cache_dir: str, quant: str, compute: str):
    return load_base(BaseConfig(model="tiny", quant=quant, compute_dtype=compute, cache_dir=cache_dir))


@pytest.mark.parametrize("quant", ["bf16", "nf4", "int8"])
def test_compute_dtype_leaves_the_fingerprint_and_fp32_widens_exactly(
    cache_dir: str, tiny_path: Path, quant: str
) -> None:
    wide, narrow = _tiny(cache_dir, quant, "fp32"), _tiny(cache_dir, quant, "bf16")
    assert wide.fingerprint == narrow.fingerprint
    assert wide.compute == "fp32" and narrow.compute == "bf16"
    for (name, w), (_, n) in zip(wide.model.named_parameters(), narrow.model.named_parameters(), strict=True):
        if type(n).__name__ in ("Params4bit", "Int8Params"):
            assert torch.equal(w.data, n.data), name  # quantized weights untouched
        else:
            assert w.dtype == torch.float32 and n.dtype == torch.bfloat16, name
            assert torch.equal(w.data, n.data.float()), name  # bf16 -> fp32 is exact
    if quant == "nf4":
        layers = [m for m in wide.model.modules() if type(m).__name__ == "Linear4bit"]
        assert layers and all(m.compute_dtype == torch.float32 for m in layers)


@pytest.mark.parametrize("quant", ["bf16", "nf4"])
def test_fp32_and_bf16_compute_give_the_same_loss(
    cache_dir: str, tiny_path: Path, users_dir: Path, quant: str
) -> None:
    results = {}
    for compute in ("fp32", "bf16"):
        base = _tiny(cache_dir, quant, compute)
        data, _ = load_user_data(DataConfig(data=str(users_dir), block_size=32), base.tokenizer, "alice")
        model = inject(base, AdapterConfig())
        pad = base.tokenizer.pad_token_id
        before = evaluate(model, data.eval, pad, base.compute, progress=False)
        cfg = TrainConfig(steps=5, batch_size=4, progress=False)
        losses = train(model, data, cfg, 1e-2, pad, base.compute).losses
        results[compute] = (before.loss, losses, adapter_state(model))
    (b32, l32, a32), (b16, l16, a16) = results["fp32"], results["bf16"]
    assert b16 == pytest.approx(b32, rel=1e-2)
    np.testing.assert_allclose(l16, l32, rtol=2e-2)
    assert a32.keys() == a16.keys() and all(a32[k].dtype == a16[k].dtype for k in a32)  # one schema


def test_devices_computing_in_fp32_and_bf16_join_one_federation(
    cache_dir: str, tiny_path: Path, users_dir: Path, tmp_path: Path
) -> None:
    """Two devices hold the same stored base (bf16), one computes in fp32, the other in bf16: one fingerprint,
    both registered on the federation's base, both updates accepted and averaged; round 0 says who computed
    in what."""
    from flwr.supercore.task_identity import TaskIdentity

    from fedpeft.config.node import DeviceNode
    from fedpeft.config.tree import FederationConfig, RunConfig
    from fedpeft.flower.server_app import run_federation

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1  # as Flower's engines set it

    nodes = {}
    for node, (user, compute) in enumerate([("alice", "fp32"), ("bob", "bf16")], start=1):
        store = tmp_path / f"store-{user}"
        nodes[node] = DeviceNode(
            data_path=str(users_dir / f"{user}.txt"),
            name=user,
            model=str(tiny_path),
            cache_dir=cache_dir,
            store=str(store),
            personal_dir=str(store / "personal"),
            compute_dtype=compute,
        )
    cfg = RunConfig(
        base=BaseConfig(model="tiny", quant="bf16", cache_dir=cache_dir),
        data=DataConfig(block_size=32, min_train_tokens=8, min_eval_tokens=8, reference_text="off"),
        train=TrainConfig(lr=5e-3, batch_size=4, progress=False),
        federation=FederationConfig(clients=2, fraction=1.0, min_clients=2, rounds=1, local_steps=2),
    )
    run = tmp_path / "run"
    run.mkdir()
    state = run_federation(DeviceGrid(nodes), cfg, run)
    zero, one = state.history
    assert {user: c["dtype"] for user, c in zero["compute"].items()} == {"alice": "fp32", "bob": "bf16"}
    assert zero["compute"]["alice"]["why"] == "--compute-dtype fp32"
    assert sorted(one["accepted"]) == ["alice", "bob"] and not one.get("skipped")
    assert any(np.any(state.arrays[k] != 0) for k in state.arrays if ".lora_B." in k)  # the average moved B
    from fedpeft.federation.rounds import round_line

    assert "computing in bf16 on 1 (--compute-dtype bf16); fp32 on 1 (--compute-dtype fp32)" in round_line(
        zero
    )
