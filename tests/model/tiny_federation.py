"""A tiny simulated federation of one adapter family, and the check that its global adapter loads in peft to
the logits fedpeft computes (tests/model/test_prompt_learning.py, tests/model/test_families.py)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from fedpeft.config.tree import (
    AdapterConfig,
    BaseConfig,
    DataConfig,
    FederationConfig,
    RunConfig,
    ServerOptConfig,
    TrainConfig,
)
from fedpeft.model.adapters import inject, load_adapter_state, read_adapter
from fedpeft.model.base import load_base

ROOT = Path(__file__).resolve().parents[2]


def federate(
    run_dir: Path,
    users: Path,
    cache_dir: str,
    monkeypatch: pytest.MonkeyPatch,
    adapter: AdapterConfig,
    lr: float,
    secure: bool,
    server_opt: ServerOptConfig | None = None,
    **fed: Any,
) -> tuple[RunConfig, Any]:
    """Two rounds of four tiny clients (all sampled, 5 local steps), in Ray; the config and the final state."""
    from fedpeft.simulation.run import simulate

    # Ray's workers import the test package too
    monkeypatch.setenv("PYTHONPATH", f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    cfg = RunConfig(
        base=BaseConfig(model="tiny", quant="none", cache_dir=cache_dir),
        adapter=adapter,
        data=DataConfig(data=str(users), block_size=32),
        train=TrainConfig(lr=lr, batch_size=4, progress=False),
        federation=FederationConfig(
            clients=4,
            fraction=1.0,
            rounds=2,
            local_steps=5,
            seed=1,
            secagg=secure,
            secagg_k=3 if secure else 2,
            **fed,
        ),
        server_opt=server_opt or ServerOptConfig(),
    )
    state = simulate(cfg, run_dir)
    history = state.history
    assert history[-1]["eval_ppl"] < history[0]["eval_ppl"] and bool(history[-1].get("secagg")) == secure
    return cfg, state


@torch.no_grad()
def _logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()


def assert_peft_loads_it(cfg: RunConfig, global_dir: Path, tiny_path: Path) -> None:
    """peft's PeftModel.from_pretrained of the folder gives fedpeft's logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    files = read_adapter(global_dir)
    ours = inject(load_base(cfg.base), files.adapter_config)
    load_adapter_state(ours, files.arrays)
    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_path), global_dir)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    torch.testing.assert_close(_logits(theirs, ids), _logits(ours, ids), rtol=1e-5, atol=1e-5)
