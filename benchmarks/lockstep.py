"""Lockstep training benchmark: K clients' local training one after another (fedpeft.training.local.train)
against the same K clients in lockstep through one base (fedpeft.training.lockstep.train_many), side by side in
one run, repeated; and the probe that explains the result on a CPU: one forward and backward of K clients'
micro-batches stacked against K of them one after another, on the base alone.

    python benchmarks/lockstep.py                 # default model, K = 5 (the main command's sampled clients)
    python benchmarks/lockstep.py --model tiny --clients 3 --repeats 1   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--clients", type=int, default=5)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default="benchmarks/results/lockstep.json")
    a = p.parse_args()

    import torch

    from fedpeft.config.tree import AdapterConfig, BaseConfig, TrainConfig
    from fedpeft.data.blocks import UserData
    from fedpeft.model.adapters import adapter_state, inject, load_adapter_state
    from fedpeft.model.base import load_base
    from fedpeft.model.placement import model_device
    from fedpeft.model.precision import autocast
    from fedpeft.training.local import causal_nll, set_checkpointing, train
    from fedpeft.training.lockstep import ClientRun, train_many

    base = load_base(BaseConfig(model=a.model))
    cfg, tc = AdapterConfig(), TrainConfig(progress=False)
    model = inject(base, cfg)
    start = adapter_state(model)
    vocab, block = base.model.config.vocab_size, 128
    g = torch.Generator().manual_seed(0)
    data = [
        UserData(f"u{i}", [torch.randint(0, vocab, (block,), generator=g) for _ in range(20)], [])
        for i in range(a.clients)
    ]
    pad, lr = base.tokenizer.pad_token_id, 1e-3

    def sequential() -> float:
        t = time.perf_counter()
        for i, d in enumerate(data):
            load_adapter_state(model, start)
            train(model, d, replace(tc, seed=i, steps=a.steps), lr, pad, base.compute)
        return time.perf_counter() - t

    def lockstep() -> float:
        runs = [ClientRun(start, d, i, a.steps) for i, d in enumerate(data)]
        t = time.perf_counter()
        train_many(model, runs, cfg, tc, lr, pad, base.compute)
        return time.perf_counter() - t

    def forward_backward(rows: int) -> float:
        ids = torch.randint(0, vocab, (rows, block), generator=g).to(model_device(model))
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        t = time.perf_counter()
        with autocast(base.compute, ids.device.type):
            nll, n = causal_nll(model, batch, tc.loss_chunk)
        (nll / n).backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    set_checkpointing(model, tc.checkpointing)
    model.train()
    forward_backward(tc.batch_size)  # warm-up
    probe = []
    for _ in range(a.repeats):
        one_by_one = sum(forward_backward(tc.batch_size) for _ in range(a.clients))
        probe.append(one_by_one / forward_backward(tc.batch_size * a.clients))
    set_checkpointing(model, False)
    model.eval()
    pairs = [(sequential(), lockstep()) for _ in range(a.repeats)]
    out = {
        "args": vars(a),
        "compute": base.compute,
        "device": str(model_device(model)),
        "sequential_s": [s for s, _ in pairs],
        "lockstep_s": [k for _, k in pairs],
        "speedup_median": statistics.median(s / k for s, k in pairs),
        "stacked_forward_backward_speedup_median": statistics.median(probe),
    }
    print(
        f"{a.clients} clients x {a.steps} steps on {a.model} ({base.compute}, {out['device']}): sequential "
        f"{statistics.median(out['sequential_s']):.1f} s, lockstep {statistics.median(out['lockstep_s']):.1f} s, "
        f"lockstep speed-up {out['speedup_median']:.2f}x (median of {a.repeats}); one forward and backward of "
        f"{a.clients} stacked micro-batches vs {a.clients} one after another: {out['stacked_forward_backward_speedup_median']:.2f}x"
    )
    Path(a.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
