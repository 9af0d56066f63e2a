"""Lockstep training equals sequential training client by client (tiny model, fp32): LoRA, IA3 and FFA-LoRA;
K = 1, 3 and 8 clients with different amounts of data, block lengths, task blocks (prompt tokens unscored) and
a client that stops early."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from fedpeft.config.tree import AdapterConfig, BaseConfig, TrainConfig
from fedpeft.data.blocks import UserData
from fedpeft.model.adapters import adapter_state, inject, load_adapter_state
from fedpeft.model.base import load_base
from fedpeft.model.multi import MultiLinear
from fedpeft.training.local import train
from fedpeft.training.lockstep import ClientRun, supports, train_many

TRAIN = TrainConfig(batch_size=2, grad_accum=2, max_grad_norm=0.5, progress=False)
LR = 5e-3


def _data(client: int) -> UserData:
    g = torch.Generator().manual_seed(100 + client)
    blocks = []
    for b in range(2 + 3 * client % 7):  # 2 to 8 blocks
        block = torch.randint(0, 256, (12 + (7 * b + client) % 20,), generator=g)
        if (client + b) % 3 == 0:  # a task block: its first tokens are the prompt (stored as ~id), unscored
            block[:5] = ~block[:5]
        blocks.append(block)
    return UserData(f"u{client}", blocks, [])


def _start(model: object, client: int) -> dict[str, np.ndarray]:
    """A global adapter away from its init (B non-zero), as after a few rounds."""
    rng = np.random.default_rng(client % 2)
    return {k: v + rng.normal(0, 0.05, v.shape).astype(v.dtype) for k, v in adapter_state(model).items()}


def _runs(model: object, k: int) -> list[ClientRun]:
    steps = [3] * k
    if k > 1:
        steps[1] = 1  # a client that stops early
    return [ClientRun(_start(model, c), _data(c), seed=7 + c, steps=steps[c]) for c in range(k)]


@pytest.mark.parametrize(
    "cfg",
    [
        AdapterConfig(kind="lora", r=4),
        AdapterConfig(kind="ia3"),
        AdapterConfig(kind="lora", r=4, freeze_a=True),
    ],
    ids=["lora", "ia3", "ffa"],
)
@pytest.mark.parametrize("k", [1, 3, 8])
def test_lockstep_equals_sequential(cache_dir: str, cfg: AdapterConfig, k: int) -> None:
    base = load_base(BaseConfig(model="tiny", quant="none", cache_dir=cache_dir))
    model = inject(base, cfg)
    pad = base.tokenizer.pad_token_id
    runs = _runs(model, k)
    lr = LR * (100 if cfg.kind == "ia3" else 1)
    assert supports(model, cfg, TRAIN) is None
    train_many(model, runs, cfg, TRAIN, lr, pad, base.compute)  # first: on a model nothing has run yet
    assert not any(isinstance(m, MultiLinear) for m in model.modules())  # the model is as it was
    want = []
    for run in runs:
        load_adapter_state(model, run.start)
        result = train(model, run.data, replace(TRAIN, seed=run.seed, steps=run.steps), lr, pad, base.compute)
        want.append((adapter_state(model), result))
    for run, (trained, result) in zip(runs, want, strict=True):
        assert run.trained.keys() == trained.keys()
        moved = max(float(np.abs(trained[key] - run.start[key]).max()) for key in trained)
        assert moved > 1e-3  # training changed the adapter: the comparison means something
        for key in trained:
            np.testing.assert_allclose(run.trained[key], trained[key], rtol=1e-4, atol=1e-6, err_msg=key)
        np.testing.assert_allclose(run.result.losses, result.losses, rtol=1e-5)
        assert run.result.tokens == result.tokens and len(run.result.losses) == run.steps
        if cfg.freeze_a:
            assert all(np.array_equal(run.trained[key], run.start[key]) for key in trained if "lora_A" in key)


def test_what_lockstep_leaves_to_the_sequential_path(cache_dir: str) -> None:
    base = load_base(BaseConfig(model="tiny", quant="none", cache_dir=cache_dir))
    model = inject(base, AdapterConfig())
    for kind in ("prompt", "vera", "dora"):
        assert "batched operator" in supports(model, AdapterConfig(kind=kind), TRAIN)
    assert "Fed-SB" in supports(model, AdapterConfig(lora_sb=True), TRAIN)
    assert "dropout" in supports(model, AdapterConfig(dropout=0.1), TRAIN)
    assert "--max-memory" in supports(model, AdapterConfig(), replace(TRAIN, max_memory=900.0))
