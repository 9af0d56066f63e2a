"""Prompt and prefix tuning (`--adapter prompt | prefix`): what trains and travels, that training learns,
that a saved adapter is a folder peft loads to the same logits, federations (secure aggregation and a server
optimizer included), serving, and the merge that cannot be."""

from __future__ import annotations

from pathlib import Path

import numpy as np
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
from fedpeft.data.blocks import load_user_data
from fedpeft.errors import FedpeftError
from fedpeft.model.adapters import adapter_state, inject, load_adapter_state, read_adapter, save_adapter
from fedpeft.model.base import load_base
from fedpeft.training.local import evaluate, train
from tests.conftest import make_text
from tests.model.tiny_federation import assert_peft_loads_it, federate

KINDS = ["prompt", "prefix"]


def _base(cache_dir: str, quant: str = "none"):
    return load_base(BaseConfig(model="tiny", quant=quant, cache_dir=cache_dir))


@torch.no_grad()
def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


@pytest.mark.parametrize("kind", KINDS)
def test_only_the_virtual_tokens_train_and_travel(cache_dir: str, tiny_path: Path, kind: str) -> None:
    base = _base(cache_dir)
    model = inject(base, AdapterConfig(kind=kind, virtual_tokens=6))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["prompt_encoder.default.embedding.weight"]
    state = adapter_state(model)
    layers = base.model.config.num_hidden_layers
    width = base.model.config.hidden_size
    if kind == "prefix":  # a key and a value per layer, per key/value head
        width = (
            2
            * layers
            * base.model.config.num_key_value_heads
            * (width // base.model.config.num_attention_heads)
        )
    assert {k: v.shape for k, v in state.items()} == {"prompt_embeddings": (6, width)}
    # the same seed builds the same init on every client (prompt: embeddings of sampled vocabulary tokens)
    again = adapter_state(inject(_base(cache_dir), AdapterConfig(kind=kind, virtual_tokens=6)))
    np.testing.assert_array_equal(again["prompt_embeddings"], state["prompt_embeddings"])
    if kind == "prompt":
        vocab = base.model.get_input_embeddings().weight.detach().numpy()
        assert all(any(np.array_equal(row, v) for v in vocab) for row in state["prompt_embeddings"])


def test_prefix_tuning_starts_as_the_base_after_its_sampled_tokens(cache_dir: str, tiny_path: Path) -> None:
    from fedpeft.model.adapters import prefix_init_ids

    base = _base(cache_dir)
    cfg = AdapterConfig(kind="prefix", virtual_tokens=5)
    model = inject(base, cfg)
    ids = prefix_init_ids(base.model.get_input_embeddings().weight.shape[0], cfg)
    x = torch.tensor([[7, 8, 9, 10, 11, 12]])
    with model.disable_adapter():
        after_tokens = _logits(model, torch.cat([ids, x], dim=1))[:, ids.shape[1] :]
    torch.testing.assert_close(_logits(model, x), after_tokens, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_training_learns_and_peft_reloads_the_same_logits(
    cache_dir: str, tiny_path: Path, users_dir: Path, tmp_path: Path, kind: str
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = _base(cache_dir)
    cfg = AdapterConfig(kind=kind, virtual_tokens=8)
    model = inject(base, cfg)
    data, _ = load_user_data(DataConfig(data=str(users_dir), block_size=32), base.tokenizer, "alice")
    pad = base.tokenizer.pad_token_id
    base_loss = evaluate(base.model, data.eval, pad, "fp32").loss  # prompt learning leaves the layers alone
    before = evaluate(model, data.eval, pad, "fp32")
    result = train(model, data, TrainConfig(steps=30, batch_size=4, progress=False), 5e-2, pad, "fp32")
    after = evaluate(model, data.eval, pad, "fp32")
    assert after.loss < before.loss - 0.1 and np.mean(result.losses[-5:]) < np.mean(result.losses[:5])
    with model.disable_adapter():  # the base is still there under the adapter
        assert evaluate(model, data.eval, pad, "fp32").loss == pytest.approx(base_loss, rel=1e-5)
    save_adapter(model, base, cfg, tmp_path / "adapter")
    ids = data.eval[0][None, :20]
    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_path), tmp_path / "adapter")
    torch.testing.assert_close(_logits(theirs, ids), _logits(model, ids), rtol=1e-5, atol=1e-5)
    # and our own loading of the folder onto a fresh base computes the same
    files = read_adapter(tmp_path / "adapter")
    fresh = inject(_base(cache_dir), files.adapter_config)
    load_adapter_state(fresh, files.arrays)
    torch.testing.assert_close(_logits(fresh, ids), _logits(model, ids), rtol=1e-5, atol=1e-5)


def test_a_prompt_adapter_cannot_merge(cache_dir: str, tiny_path: Path, tmp_path: Path) -> None:
    from fedpeft.model.merge import merge_base

    base = _base(cache_dir)
    save_adapter(
        inject(base, AdapterConfig(kind="prompt")), base, AdapterConfig(kind="prompt"), tmp_path / "a"
    )
    with pytest.raises(FedpeftError, match="no weights to merge"):
        merge_base(read_adapter(tmp_path / "a"), "full", str(tiny_path), cache_dir)


def test_served_prompt_adapters_answer_what_peft_generate_does(
    cache_dir: str, tiny_path: Path, tmp_path: Path
) -> None:
    from fedpeft.serve.catalog import discover
    from fedpeft.serve.engine import Engine
    from fedpeft.serve.jobs import Job, Sampling
    from tests.serve.runs import peft_generate

    base = _base(cache_dir)
    cfg = AdapterConfig(kind="prompt", virtual_tokens=4)
    model = inject(base, cfg)
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        load_adapter_state(model, {"prompt_embeddings": rng.normal(0, 1, (4, 64)).astype(np.float32)})
        save_adapter(model, base, cfg, tmp_path / name)
    engine = Engine(_base(cache_dir), discover([], [f"a={tmp_path / 'a'}", f"b={tmp_path / 'b'}"]))
    prompts = {"base": "the quick brown", "a": "a small bird", "b": "over the lazy dog"}
    jobs = [Job(engine.encode(p), m, Sampling(10, temperature=0)) for m, p in prompts.items()]
    engine.run(jobs)
    assert all(j.finish in ("stop", "length") for j in jobs)
    for (name, prompt), job in zip(prompts.items(), jobs, strict=True):
        assert job.ids == peft_generate(engine, name, prompt, 10)[: len(job.ids)]


@pytest.mark.parametrize("kind", KINDS)
def test_fedpeft_generate_puts_prompt_adapters_side_by_side(
    cache_dir: str, tiny_path: Path, tmp_path: Path, kind: str
) -> None:
    from fedpeft.serve.generate import compare
    from tests.serve.runs import write_run

    write_run(
        tmp_path / "run",
        _base(cache_dir),
        ["alice"],
        cfg=AdapterConfig(kind=kind, virtual_tokens=4),
        scale=0.5,
    )
    out = compare(tmp_path / "run", "alice", "the quick brown", 6, None, cache_dir)
    assert (
        "--- base ---" in out
        and "--- global (round 3) ---" in out
        and "--- personal (round 3, kept) ---" in out
    )


@pytest.fixture
def fed_users(tmp_path: Path) -> Path:
    root = tmp_path / "users"
    root.mkdir()
    for i in range(4):
        (root / f"user{i}.txt").write_text(make_text(20 + i, 500))
    return root


def test_round_zero_reports_the_base_although_the_prompts_init_is_not_it(
    fed_users: Path, cache_dir: str, tiny_path: Path
) -> None:
    from fedpeft.device.runtime import Device

    cfg = RunConfig(
        base=BaseConfig(model="tiny", quant="none", cache_dir=cache_dir),
        adapter=AdapterConfig(kind="prompt", virtual_tokens=4),
        data=DataConfig(data=str(fed_users), block_size=32),
        train=TrainConfig(progress=False),
        federation=FederationConfig(clients=4, fraction=1.0, rounds=1),
    )
    device = Device(cfg)
    init = device.init_state
    zero, one = device.reference_losses(0, init), device.reference_losses(1, init)
    assert zero["reference_loss"] == zero["base_reference_loss"] == one["base_reference_loss"]
    assert one["reference_loss"] != one["base_reference_loss"]  # the sampled virtual tokens change the output
    assert device.evaluate(0, init, bare=True)[0] != device.evaluate(0, init)[0]


@pytest.mark.simulation
@pytest.mark.parametrize("kind,secure", [("prompt", True), ("prefix", False)])
def test_a_federation_learns_and_its_global_adapter_loads_in_peft(
    tmp_path: Path,
    fed_users: Path,
    cache_dir: str,
    tiny_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    kind: str,
    secure: bool,
) -> None:
    adapter = AdapterConfig(kind=kind, virtual_tokens=8)
    server_opt = ServerOptConfig(name="fedadam", lr=5e-2) if secure else None
    cfg, state = federate(
        tmp_path / "run", fed_users, cache_dir, monkeypatch, adapter, 5e-2, secure, server_opt
    )
    width = 64 if kind == "prompt" else 2 * 2 * 2 * 16  # tiny: 2 layers, 2 key/value heads of 16
    assert state.history[-1]["bytes_up"] / 4 < 4 * 8 * width + 4000  # one small matrix per client and round
    assert_peft_loads_it(cfg, tmp_path / "run" / "global", tiny_path)
