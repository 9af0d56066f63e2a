"""The batched adapter operator against peft: a batch mixing LoRA adapters of different ranks, IA3 adapters and
the base computes, row by row, what peft computes for that row's adapter alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedpeft.config.tree import AdapterConfig, BaseConfig
from fedpeft.errors import FedpeftError
from fedpeft.model.adapters import adapter_state, inject, load_adapter_state
from fedpeft.model.base import load_base
from fedpeft.model.multi import MultiAdapter, MultiLinear

ADAPTERS = {  # name: (config, seed)
    "l8": (AdapterConfig(kind="lora", r=8, alpha=16.0), 1),
    "l4": (AdapterConfig(kind="lora", r=4, alpha=8.0, seed=3), 2),
    "l2q": (AdapterConfig(kind="lora", r=2, alpha=4.0, target_modules=("q_proj", "v_proj")), 3),
    "ia": (AdapterConfig(kind="ia3"), 4),
    "ib": (AdapterConfig(kind="ia3", seed=5), 5),
}
ROWS = ["l8", None, "ia", "l4", "l2q", "ib", "l8", "ia"]


def _random(
    cfg: AdapterConfig, seed: int, cache: str
) -> tuple[dict[str, np.ndarray], torch.Tensor, torch.Tensor]:
    """An adapter with random weights (A and B non-zero, IA3 vectors away from 1) and peft's logits for it, in
    fp32 and under bf16 autocast."""
    base = load_base(BaseConfig(model="tiny", quant="none", cache_dir=cache))
    model = inject(base, cfg)
    rng = np.random.default_rng(seed)
    arrays = {k: v + rng.normal(0, 0.3, v.shape).astype(v.dtype) for k, v in adapter_state(model).items()}
    load_adapter_state(model, arrays)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=IDS, attention_mask=MASK).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model(input_ids=IDS, attention_mask=MASK).logits.float()
    return arrays, logits, bf16


IDS = torch.randint(0, 256, (len(ROWS), 9), generator=torch.Generator().manual_seed(0))
MASK = torch.ones_like(IDS)
MASK[1, :3] = 0  # a left-padded row
MASK[4, :5] = 0


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict]:
    cache = str(tmp_path_factory.mktemp("cache"))
    return cache, {name: _random(cfg, seed, cache) for name, (cfg, seed) in ADAPTERS.items()}


def _multi(cache: str, adapters: dict) -> MultiAdapter:
    base = load_base(BaseConfig(model="tiny", quant="none", cache_dir=cache))
    multi = MultiAdapter(base.model)
    for name, (arrays, *_) in adapters.items():
        multi.add(name, ADAPTERS[name][0], arrays)
    return multi


# runs of two rows per adapter: the per-adapter (segment) product instead of a gathered copy per row
RUNS = ["l8", "l8", "l4", "l4", "ia", "ia", "l2q", "l2q"]


@pytest.mark.parametrize("rows", [ROWS, RUNS], ids=["gathered", "segments"])
def test_mixed_rows_equal_peft_for_each_row(reference: tuple[str, dict], rows: list) -> None:
    cache, adapters = reference
    multi = _multi(cache, adapters)
    plain = load_base(BaseConfig(model="tiny", quant="none", cache_dir=cache)).model
    with torch.no_grad():
        base_logits = plain(input_ids=IDS, attention_mask=MASK).logits
        with multi.rows_of(rows):
            got = multi.model(input_ids=IDS, attention_mask=MASK).logits
        alone = multi.model(input_ids=IDS, attention_mask=MASK).logits  # no rows set: the base itself
    assert multi.rows.segment == (2 if rows is RUNS else 0)
    for row, name in enumerate(rows):
        want = base_logits[row] if name is None else adapters[name][1][row]
        keep = MASK[row].bool()
        torch.testing.assert_close(got[row][keep], want[keep], rtol=1e-4, atol=1e-4)
        if name is not None:  # the adapter changes the output, so the comparison above means something
            assert (want[keep] - base_logits[row][keep]).abs().max() > 1e-2
    torch.testing.assert_close(alone, base_logits, rtol=0, atol=0)


def test_bf16_within_rounding(reference: tuple[str, dict]) -> None:
    cache, adapters = reference
    multi = _multi(cache, adapters)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), multi.rows_of(ROWS):
        got = multi.model(input_ids=IDS, attention_mask=MASK).logits.float()
    for row, name in enumerate(ROWS):
        if name is None:
            continue
        keep = MASK[row].bool()
        _, fp32, bf16 = adapters[name]
        noise = (bf16[row][keep] - fp32[row][keep]).abs().max()  # what bf16 itself costs peft
        assert (got[row][keep] - bf16[row][keep]).abs().max() <= 2 * noise


def test_add_and_drop_touch_only_that_adapter(reference: tuple[str, dict]) -> None:
    cache, adapters = reference
    multi = _multi(cache, {"l8": adapters["l8"]})
    weight = multi.model.get_submodule("model.layers.0.self_attn.q_proj").base_layer.weight
    multi.add("l4", ADAPTERS["l4"][0], adapters["l4"][0])
    assert (
        multi.model.get_submodule("model.layers.0.self_attn.q_proj").base_layer.weight is weight
    )  # not copied
    multi.drop("l8")
    with pytest.raises(FedpeftError, match="no adapter named l8"), multi.rows_of(["l8"]):
        pass
    with torch.no_grad(), multi.rows_of(["l4"] * len(ROWS)):
        got = multi.model(input_ids=IDS, attention_mask=MASK).logits
    torch.testing.assert_close(got[3], adapters["l4"][1][3], rtol=1e-5, atol=1e-5)
    multi.unwrap()
    assert not any(isinstance(m, MultiLinear) for m in multi.model.modules())


def test_bad_adapters_are_refused_whole(reference: tuple[str, dict]) -> None:
    cache, adapters = reference
    multi = _multi(cache, {})
    arrays = dict(adapters["l8"][0])
    arrays.pop(next(k for k in arrays if k.endswith("lora_B.weight")))
    with pytest.raises(FedpeftError, match="lacks .lora_B.weight"):
        multi.add("broken", ADAPTERS["l8"][0], arrays)
    wide = {
        k: np.zeros((v.shape[0], v.shape[1] + 1), v.dtype) if "lora_A" in k else v
        for k, v in adapters["l8"][0].items()
    }
    with pytest.raises(FedpeftError, match="takes"):
        multi.add("wide", ADAPTERS["l8"][0], wide)
    ranks = {k: v[:4] if "lora_A" in k and "layers.1." in k else v for k, v in adapters["l8"][0].items()}
    with pytest.raises(FedpeftError, match="disagree on the rank"):
        multi.add("ranks", ADAPTERS["l8"][0], ranks)
    assert all(not layer.lora for layer in multi.layers.values())
    with pytest.raises(FedpeftError, match="not applied per layer"):
        multi.add("p", AdapterConfig(kind="prompt"), {})


def test_gradients_reach_each_rows_adapter_only(reference: tuple[str, dict]) -> None:
    cache, adapters = reference
    base = load_base(BaseConfig(model="tiny", quant="none", cache_dir=cache))
    multi = MultiAdapter(base.model)
    base.model.requires_grad_(False)
    for name in ("l8", "l4"):
        arrays = {k: torch.tensor(v, requires_grad=True) for k, v in adapters[name][0].items()}
        multi.add(name, ADAPTERS[name][0], arrays)
    with multi.rows_of(["l8", "l8", None, None, None, None, None, None]):
        multi.model(input_ids=IDS, attention_mask=MASK).logits.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in multi.parameters_of("l8"))
    assert all(p.grad is None for p in multi.parameters_of("l4"))
