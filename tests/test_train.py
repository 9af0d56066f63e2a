from pathlib import Path

import numpy as np
import pytest
import torch

from fedpeft.adapters import adapter_state, inject
from fedpeft.base import dequantize_linears, load_base
from fedpeft.config import AdapterConfig, BaseConfig, DataConfig, TrainConfig
from fedpeft.data import load_user_data
from fedpeft.train import evaluate, train


def _setup(cache_dir: str, users_dir: Path, quant: str = "none", kind: str = "lora", freeze_a: bool = False):
    base = load_base(BaseConfig(model="tiny", quant=quant, cache_dir=cache_dir))
    data, _ = load_user_data(DataConfig(data=str(users_dir), block_size=32), base.tokenizer, "alice")
    model = inject(base, AdapterConfig(kind=kind, freeze_a=freeze_a))
    return base, data, model


@pytest.mark.parametrize("quant,kind", [("none", "lora"), ("nf4", "lora"), ("bf16", "ia3")])
def test_training_lowers_held_out_loss(
    cache_dir: str, tiny_path: Path, users_dir: Path, quant: str, kind: str
) -> None:
    base, data, model = _setup(cache_dir, users_dir, quant, kind)
    pad = base.tokenizer.pad_token_id
    before = evaluate(model, data.eval, pad, quant)
    cfg = TrainConfig(steps=30, batch_size=4, progress=False, lr=1e-2 if kind == "lora" else 5e-2)
    result = train(model, data, cfg, cfg.learning_rate(kind), pad, quant)
    after = evaluate(model, data.eval, pad, quant)
    assert len(result.losses) == 30
    # the tiny corpus is a 20-word vocabulary: a random model learns it quickly
    assert after.loss < before.loss - 0.1
    assert np.mean(result.losses[-5:]) < np.mean(result.losses[:5])
    assert after.ppl == pytest.approx(np.exp(after.loss))


def test_training_is_reproducible(cache_dir: str, tiny_path: Path, users_dir: Path) -> None:
    runs = []
    for _ in range(2):
        base, data, model = _setup(cache_dir, users_dir)
        cfg = TrainConfig(steps=5, batch_size=2, grad_accum=2, progress=False)
        train(model, data, cfg, 1e-3, base.tokenizer.pad_token_id, "none")
        runs.append(adapter_state(model))
    for k in runs[0]:
        np.testing.assert_array_equal(runs[0][k], runs[1][k])


def test_freeze_a_trains_only_b(cache_dir: str, tiny_path: Path, users_dir: Path) -> None:
    base, data, model = _setup(cache_dir, users_dir, freeze_a=True)
    start = adapter_state(model)
    train(model, data, TrainConfig(steps=3, progress=False), 1e-2, base.tokenizer.pad_token_id, "none")
    end = adapter_state(model)
    for k in start:
        if ".lora_A." in k:
            np.testing.assert_array_equal(start[k], end[k])
        else:
            assert not np.array_equal(start[k], end[k])


def test_evaluate_matches_transformers_loss(cache_dir: str, tiny_path: Path, users_dir: Path) -> None:
    base, data, model = _setup(cache_dir, users_dir)
    block = data.eval[0]
    ours = evaluate(model, [block], base.tokenizer.pad_token_id, "none")
    with torch.no_grad():
        hf = model(input_ids=block[None], labels=block[None]).loss.item()
    assert ours.loss == pytest.approx(hf, rel=1e-5)
    assert ours.tokens == len(block) - 1


def _lora_grads(
    cache_dir: str, x: torch.Tensor, dequantize: bool, eval_first: bool
) -> dict[str, torch.Tensor]:
    base = load_base(BaseConfig(model="tiny", quant="nf4", cache_dir=cache_dir))
    model = inject(base, AdapterConfig())
    g = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        if ".lora_B." in name:  # non-zero B so gradients reach A and earlier layers
            torch.nn.init.normal_(p, std=0.1, generator=g)
    if eval_first:
        evaluate(model, [x[0]], 0, "nf4")
    if dequantize:
        dequantize_linears(base.model)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=x, labels=x).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_nf4_gradients_match_dequantized_reference_even_after_eval(cache_dir: str, tiny_path: Path) -> None:
    """Guards against bitsandbytes' CPU inference packing, which silently breaks gradients after an eval
    (see base.disable_cpu_4bit_packing)."""
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    ref = _lora_grads(cache_dir, x, dequantize=True, eval_first=False)
    got = _lora_grads(cache_dir, x, dequantize=False, eval_first=True)
    for k in ref:
        rel = float((got[k] - ref[k]).norm() / ref[k].norm())
        assert rel < 0.05, (k, rel)


def test_eval_leaves_the_nf4_base_bit_identical(cache_dir: str, tiny_path: Path, users_dir: Path) -> None:
    from fedpeft.base import fingerprint

    base, data, model = _setup(cache_dir, users_dir, quant="nf4")
    before = fingerprint(model, "nf4")  # base tensors + (constant) adapter tensors
    evaluate(model, data.eval, base.tokenizer.pad_token_id, "nf4")
    assert fingerprint(model, "nf4") == before
