"""Fed-SB (fedpeft.model.fed_sb), VeRA and DoRA: the basis every device derives alike, the fold to plain LoRA,
and each family trained, aggregated and exported in a tiny federation that peft loads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedpeft.config.tree import (
    AdapterConfig,
    BaseConfig,
)
from fedpeft.model.adapters import (
    adapter_off,
    adapter_state,
    inject,
    load_adapter_state,
    read_adapter,
    save_adapter,
)
from fedpeft.model.base import load_base
from fedpeft.model.fed_sb import basis, fold
from tests.model.test_prompt_learning import fed_users  # noqa: F401  (the fixture)
from tests.model.tiny_federation import assert_peft_loads_it, federate

SB = AdapterConfig(r=4, lora_sb=True)


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_the_basis_is_orthonormal_and_its_signs_do_not_depend_on_the_svd() -> None:
    w = torch.randn(12, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    b, a = basis(w, 3)
    torch.testing.assert_close(b.T @ b, torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(a @ a.T, torch.eye(3, dtype=torch.float64))
    # the same subspace as the top singular vectors, with each column's largest entry positive
    assert (b.gather(0, b.abs().argmax(0, keepdim=True)) > 0).all()
    u, s, vh = torch.linalg.svd(w)
    torch.testing.assert_close(b @ torch.diag(s[:3]) @ a, u[:, :3] @ torch.diag(s[:3]) @ vh[:3])
    # an SVD that returned -u, -v for some pair gives the same basis
    b2, a2 = basis(-w, 3)
    torch.testing.assert_close(b2 @ a2, -(b @ a))
    assert (b2.gather(0, b2.abs().argmax(0, keepdim=True)) > 0).all()
    with torch.random.fork_rng():
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            b1, a1 = basis(w, 3)
        finally:
            torch.set_num_threads(threads)
    torch.testing.assert_close(b1, b, rtol=0, atol=1e-12)


def test_fold_is_b_times_r_on_crafted_tensors() -> None:
    b = np.arange(6, dtype=np.float32).reshape(3, 2)
    r = np.array([[1.0, 2.0], [0.5, -1.0]], dtype=np.float32)
    a = np.ones((2, 4), dtype=np.float32)
    arrays = {"m.lora_A.weight": a, "m.lora_B.weight": b, "m.lora_R.weight": r, "n.ia3_l": np.ones(2)}
    out = fold(arrays)
    assert sorted(out) == ["m.lora_A.weight", "m.lora_B.weight", "n.ia3_l"]
    np.testing.assert_array_equal(out["m.lora_B.weight"], b @ r)
    np.testing.assert_array_equal(out["m.lora_A.weight"], a)


def test_fed_sb_trains_only_r_every_device_builds_the_same_basis_and_the_export_loads_in_peft(
    cache_dir: str, tiny_path: Path, tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = load_base(BaseConfig(model="tiny", quant="none", cache_dir=cache_dir))
    model = inject(base, SB)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    before = _logits(model, ids)
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all(".lora_R." in n for n in trained)
    state = adapter_state(model)
    other = adapter_state(inject(load_base(BaseConfig(model="tiny", quant="none", cache_dir=cache_dir)), SB))
    for k in state:  # a second device: the same A and B to the bit, R zero
        np.testing.assert_array_equal(state[k], other[k])
    with adapter_off(model):  # R = 0: the adapter starts as the base
        torch.testing.assert_close(before, _logits(model, ids))
    rng = np.random.default_rng(0)
    state = {
        k: (rng.normal(0, 0.3, v.shape).astype(np.float32) if ".lora_R." in k else v)
        for k, v in state.items()
    }
    load_adapter_state(model, state)
    ours = _logits(model, ids)
    assert (ours - before).abs().max() > 1e-2  # R reaches the output
    save_adapter(model, base, SB, tmp_path / "sb")
    files = read_adapter(tmp_path / "sb")
    assert not any(".lora_R." in k for k in files.arrays) and not files.adapter_config.lora_sb
    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_path), tmp_path / "sb")
    torch.testing.assert_close(_logits(theirs, ids), ours, rtol=1e-5, atol=1e-5)


@pytest.mark.simulation
@pytest.mark.parametrize(
    "kind,mode,secure", [("lora", "sb", True), ("vera", "fedavg", False), ("dora", "fedavg", False)]
)
def test_each_family_federates_and_its_global_adapter_loads_in_peft(
    tmp_path: Path,
    fed_users: Path,  # noqa: F811
    cache_dir: str,
    tiny_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    kind: str,
    mode: str,
    secure: bool,
) -> None:
    adapter = AdapterConfig(kind=kind, r=4 if kind != "vera" else 32)
    cfg, state = federate(
        tmp_path / "run", fed_users, cache_dir, monkeypatch, adapter, 2e-2, secure, lora_mode=mode
    )
    travel = state.info.travel_keys
    if mode == "sb":  # only the r x r matrices travel: 2 layers x 7 targets x 4 x 4 numbers
        assert travel and all(k.endswith(".lora_R.weight") for k in travel)
        assert sum(state.arrays[k].size for k in travel) == 2 * 7 * 16
    if kind == "vera":  # the shared random matrices never travel
        assert travel and all(".vera_lambda_" in k for k in travel)
    assert_peft_loads_it(cfg, tmp_path / "run" / "global", tiny_path)


@pytest.mark.parametrize("cfg", [AdapterConfig(kind="vera", r=16), AdapterConfig(kind="dora", r=4)])
def test_vera_and_dora_merge_into_the_weights(cache_dir: str, tmp_path: Path, cfg: AdapterConfig) -> None:
    from fedpeft.model.merge import merged_model

    base = load_base(BaseConfig(model="tiny", quant="none", cache_dir=cache_dir))
    model = inject(base, cfg)
    rng = np.random.default_rng(0)
    state = {
        k: v + rng.normal(0, 0.05, v.shape).astype(np.float32) if trained else v
        for k, v in adapter_state(model).items()
        for trained in [".vera_lambda_" in k or ".lora_B." in k]
    }
    load_adapter_state(model, state)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    ours = _logits(model, ids)
    save_adapter(model, base, cfg, tmp_path / "a")
    merged = merged_model(
        load_base(BaseConfig(model="tiny", quant="none", cache_dir=cache_dir)), read_adapter(tmp_path / "a")
    )
    with adapter_off(model):
        assert (ours - _logits(model, ids)).abs().max() > 1e-3  # the adapter changes the output
    torch.testing.assert_close(_logits(merged, ids), ours, rtol=1e-5, atol=1e-5)
