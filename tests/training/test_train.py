from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedpeft.config.tree import AdapterConfig, BaseConfig, DataConfig, TrainConfig
from fedpeft.data.blocks import load_user_data
from fedpeft.errors import FedpeftError
from fedpeft.model.adapters import adapter_state, inject
from fedpeft.model.base import load_base
from fedpeft.model.precision import autocast
from fedpeft.model.quant import dequantize_linears
from fedpeft.training.local import causal_nll, evaluate, set_checkpointing, train


def _setup(cache_dir: str, users_dir: Path, quant: str = "none", kind: str = "lora", freeze_a: bool = False):
    # a stored bf16/int8/nf4 base computes in bf16 here, so the autocast path is covered whatever `auto`
    # would measure on the machine running the tests
    compute = "fp32" if quant == "none" else "bf16"
    base = load_base(BaseConfig(model="tiny", quant=quant, compute_dtype=compute, cache_dir=cache_dir))
    data, _ = load_user_data(DataConfig(data=str(users_dir), block_size=32), base.tokenizer, "alice")
    model = inject(base, AdapterConfig(kind=kind, freeze_a=freeze_a))
    return base, data, model


@pytest.mark.parametrize("quant,kind", [("none", "lora"), ("nf4", "lora"), ("bf16", "ia3")])
def test_training_lowers_held_out_loss(
    cache_dir: str, tiny_path: Path, users_dir: Path, quant: str, kind: str
) -> None:
    base, data, model = _setup(cache_dir, users_dir, quant, kind)
    pad = base.tokenizer.pad_token_id
    before = evaluate(model, data.eval, pad, base.compute)
    cfg = TrainConfig(steps=30, batch_size=4, progress=False, lr=1e-2 if kind == "lora" else 5e-2)
    result = train(model, data, cfg, cfg.learning_rate(kind), pad, base.compute)
    after = evaluate(model, data.eval, pad, base.compute)
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
        train(model, data, cfg, 1e-3, base.tokenizer.pad_token_id, "fp32")
        runs.append(adapter_state(model))
    for k in runs[0]:
        np.testing.assert_array_equal(runs[0][k], runs[1][k])


def test_freeze_a_trains_only_b(cache_dir: str, tiny_path: Path, users_dir: Path) -> None:
    base, data, model = _setup(cache_dir, users_dir, freeze_a=True)
    start = adapter_state(model)
    train(model, data, TrainConfig(steps=3, progress=False), 1e-2, base.tokenizer.pad_token_id, "fp32")
    end = adapter_state(model)
    for k in start:
        if ".lora_A." in k:
            np.testing.assert_array_equal(start[k], end[k])
        else:
            assert not np.array_equal(start[k], end[k])


def test_evaluate_matches_transformers_loss(cache_dir: str, tiny_path: Path, users_dir: Path) -> None:
    base, data, model = _setup(cache_dir, users_dir)
    block = data.eval[0]
    ours = evaluate(model, [block], base.tokenizer.pad_token_id, "fp32")
    with torch.no_grad():
        hf = model(input_ids=block[None], labels=block[None]).loss.item()
    assert ours.loss == pytest.approx(hf, rel=1e-5)
    assert ours.tokens == len(block) - 1


def _lora_grads(
    cache_dir: str, x: torch.Tensor, dequantize: bool, eval_first: bool
) -> dict[str, torch.Tensor]:
    base = load_base(BaseConfig(model="tiny", quant="nf4", compute_dtype="bf16", cache_dir=cache_dir))
    model = inject(base, AdapterConfig())
    g = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        if ".lora_B." in name:  # non-zero B so gradients reach A and earlier layers
            torch.nn.init.normal_(p, std=0.1, generator=g)
    if eval_first:
        evaluate(model, [x[0]], 0, base.compute)
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
    from fedpeft.model.fingerprint import fingerprint

    base, data, model = _setup(cache_dir, users_dir, quant="nf4")
    before = fingerprint(model, "nf4")  # base tensors + (constant) adapter tensors
    evaluate(model, data.eval, base.tokenizer.pad_token_id, base.compute)
    assert fingerprint(model, "nf4") == before


def _padded_batch() -> dict[str, torch.Tensor]:
    """Four blocks of different lengths: right padding, and label tokens not a multiple of the chunk."""
    from fedpeft.data.blocks import collate

    g = torch.Generator().manual_seed(0)
    return collate([torch.randint(0, 256, (n,), generator=g) for n in (32, 20, 32, 7)], 0)


def _randomized(model: Any, seed: int = 0) -> Any:
    """Non-zero adapter weights (LoRA B starts at zero, IA3 at one) so the adapter changes the loss."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            with torch.no_grad():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _loss_and_grads(model: Any, fn: Any, compute: str) -> tuple[float, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    model.train()
    with autocast(compute):
        loss = fn()
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.eval()
    return loss.item(), grads


def _max_rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).norm() / y.norm()) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize(
    "quant,kind,targets",
    [
        ("none", "lora", None),
        ("none", "ia3", None),
        ("nf4", "lora", None),
        ("nf4", "ia3", None),
        ("none", "lora", ("q_proj", "v_proj", "lm_head")),  # an adapted output layer: recomputed chunks
    ],
)
def test_chunked_loss_matches_transformers(
    cache_dir: str, tiny_path: Path, quant: str, kind: str, targets: tuple[str, ...] | None
) -> None:
    # a quantized base computing in bf16: the autocast path, whose rounding differs from transformers' own
    compute = "fp32" if quant == "none" else "bf16"
    base = load_base(BaseConfig(model="tiny", quant=quant, compute_dtype=compute, cache_dir=cache_dir))
    cfg = AdapterConfig(kind=kind) if targets is None else AdapterConfig(kind=kind, target_modules=targets)
    model = _randomized(inject(base, cfg))
    batch = _padded_batch()
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    hf_loss, hf_grads = _loss_and_grads(model, lambda: model(**batch).loss, compute)
    for chunk in (0, 5, 128):
        loss, grads = _loss_and_grads(
            model, lambda c=chunk: causal_nll(model, batch, c)[0] / labelled, compute
        )
        assert loss == pytest.approx(hf_loss, rel=1e-5), chunk
        # bf16 autocast rounds the chunked path's logit gradients at another point than transformers'
        assert _max_rel(grads, hf_grads) < (1e-4 if quant == "none" else 0.03), chunk
    with torch.no_grad(), autocast(compute):
        assert causal_nll(model, batch, 5)[1] == labelled
    if targets is not None:  # the adapted lm_head is in the gradients, and they are not zero
        assert any(".lm_head." in n for n, p in model.named_parameters() if p.requires_grad)


def _checkpointing_flags(model: Any) -> set[bool]:
    return {m.gradient_checkpointing for m in model.modules() if hasattr(m, "gradient_checkpointing")}


def test_checkpointed_gradients_match_plain_ones(cache_dir: str, tiny_path: Path) -> None:
    base = load_base(BaseConfig(model="tiny", quant="nf4", compute_dtype="bf16", cache_dir=cache_dir))
    model = _randomized(inject(base, AdapterConfig()))
    batch = _padded_batch()
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    plain = _loss_and_grads(model, lambda: causal_nll(model, batch, 0)[0] / labelled, "bf16")
    assert set_checkpointing(model, True) is False
    assert set_checkpointing(model, True) is True  # idempotent
    assert _checkpointing_flags(model) == {True}
    ckpt = _loss_and_grads(model, lambda: causal_nll(model, batch, 0)[0] / labelled, "bf16")
    set_checkpointing(model, False)
    assert ckpt[0] == pytest.approx(plain[0], rel=1e-6)
    assert _max_rel(ckpt[1], plain[1]) < 1e-3


def test_train_recomputes_layers_only_while_training(
    cache_dir: str, tiny_path: Path, users_dir: Path
) -> None:
    """Checkpointing runs each decoder layer twice per micro-batch in train() (forward, then again in
    backward), once without it; it is off again after train(), for evaluation and generation, every time."""
    base, data, model = _setup(cache_dir, users_dir, quant="nf4")
    calls = []
    mlp = model.get_base_model().model.layers[0].mlp
    # a pre-hook: the recomputation stops inside the layer once it has what backward needs
    mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    pad = base.tokenizer.pad_token_id
    before = evaluate(model, data.eval, pad, base.compute)
    for checkpointing, per_micro_batch in [(True, 2), (False, 1), (True, 2), (True, 2)]:
        calls.clear()
        cfg = TrainConfig(steps=2, batch_size=2, grad_accum=2, checkpointing=checkpointing, progress=False)
        train(model, data, cfg, 0.0, pad, base.compute)  # lr 0: the adapter stays as it was
        assert len(calls) == 2 * 2 * per_micro_batch
        assert _checkpointing_flags(model) == {False} and not model.training
    calls.clear()
    assert evaluate(model, data.eval, pad, base.compute).loss == pytest.approx(before.loss, rel=1e-6)
    assert len(calls) == -(-len(data.eval) // 8)  # one pass per evaluation batch


def _micro_batch_run(cache_dir: str, users_dir: Path, **kw: Any) -> tuple[list[float], dict[str, np.ndarray]]:
    base, data, model = _setup(cache_dir, users_dir)
    assert len({len(b) for b in data.train}) > 1  # a short last block: padding inside the batch
    ref = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    cfg = TrainConfig(steps=3, progress=False, **kw)
    result = train(model, data, cfg, 1e-2, base.tokenizer.pad_token_id, "fp32", prox=(0.5, ref))
    return result.losses, adapter_state(model)


def test_micro_batches_give_the_full_batch_result(cache_dir: str, tiny_path: Path, users_dir: Path) -> None:
    """A step is its batch_size x grad_accum blocks whatever the split: the loss is the mean over the step's
    label tokens and Ditto's prox term counts once per step."""
    full_losses, full = _micro_batch_run(cache_dir, users_dir, batch_size=8, grad_accum=1)
    for batch_size, grad_accum in [(1, 8), (2, 4)]:
        losses, state = _micro_batch_run(cache_dir, users_dir, batch_size=batch_size, grad_accum=grad_accum)
        np.testing.assert_allclose(losses, full_losses, rtol=1e-5)
        for k in full:
            np.testing.assert_allclose(state[k], full[k], rtol=1e-3, atol=1e-5)
    # a budget the whole batch fits in trains it as one micro-batch
    losses, state = _micro_batch_run(cache_dir, users_dir, batch_size=2, grad_accum=4, max_memory=1e6)
    np.testing.assert_allclose(losses, full_losses, rtol=1e-5)


def test_a_budget_too_small_stops_train_with_one_line(
    cache_dir: str, tiny_path: Path, users_dir: Path
) -> None:
    base, data, model = _setup(cache_dir, users_dir)
    cfg = TrainConfig(steps=1, progress=False, max_memory=100)
    with pytest.raises(
        FedpeftError, match=r"^--max-memory 100 MiB is too small .* is \d+ MiB \(micro-batch 1\)$"
    ):
        train(model, data, cfg, 1e-2, base.tokenizer.pad_token_id, "fp32")
