"""Memory benchmark: a device's training process on the shared base, with and without gradient checkpointing
and the chunked cross-entropy (fedpeft.training.local), side by side in one run.

Each setting runs in a fresh subprocess, one at a time, so each peak is that setting's own:
  - process peak RSS: the kernel's high-water mark (VmHWM) of the whole process (torch, libraries, base,
    data, training and evaluation), what a device owner budgets;
  - training peak RSS: sampled from /proc every 5 ms during the timed steps only;
  - step time: median over --steps timed optimizer steps (after one untimed), batch 4 x 128, in that
    process (and its fastest step), and again with every setting's steps alternating in one more process
    (ratios that hold while something else also uses the machine, as long as it does so evenly);
  - evaluation peak: sampled while evaluating the held-out blocks (batch 8) after training.
Prints a markdown table with ratios to the plain setting and the issue's targets; writes --json.

    python benchmarks/memory.py                         # the default model, NF4, LoRA (~3 min on 2 cores)
    python benchmarks/memory.py --model tiny --steps 2  # a smoke run
    python benchmarks/memory.py --calibrate             # the micro-batch sweep behind fedpeft/model/memory.py
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.core import PeakRSS, status  # noqa: E402

SETTINGS = {  # name: (checkpointing, loss_chunk, heap: glibc's own, fast or compact; fedpeft.model.memory)
    "before (glibc heap)": (False, 0, "glibc"),  # plain, as train() ran before fedpeft.model.memory existed
    "plain": (False, 0, "fast"),
    "checkpointing": (True, 0, "fast"),
    "chunked CE": (False, 128, "fast"),
    "both": (True, 128, "fast"),
    "both, compact heap": (True, 128, "compact"),
}
# The targets: the whole device (this process plus Flower's SuperNode, 150-300 MiB) in 1 GiB,
# and the step with both on at most 1.3x the step without checkpointing.
DEVICE_MIB = 1024
SUPERNODE_MIB = 300
MAX_STEP_RATIO = 1.3


def worker(job: dict) -> dict:
    """One setting in this (fresh) process."""
    import torch

    torch.set_num_threads(job["threads"])
    import bitsandbytes  # noqa: F401  (what a device imports anyway: the runtime before any model)
    import peft  # noqa: F401
    import transformers  # noqa: F401

    from fedpeft.config.tree import AdapterConfig, BaseConfig, DataConfig, TrainConfig
    from fedpeft.data.blocks import load_user_data
    from fedpeft.model.adapters import inject, trainable_parameters
    from fedpeft.model.base import load_base
    from fedpeft.training import local as train_module
    from fedpeft.training.local import evaluate, train

    if job["heap"] == "glibc":  # glibc's own heap policy: no fixed mmap threshold, no trim
        train_module.release_heap = lambda compact=False: None

    out = {**job, "rss_imports_mib": status("VmRSS")}
    base = load_base(BaseConfig(model=job["model"], quant=job["quant"], cache_dir=job["cache_dir"]))
    data, _ = load_user_data(
        DataConfig(data=job["data"], block_size=job["block"]), base.tokenizer, job["user"]
    )
    model = inject(base, AdapterConfig(kind=job["adapter"]))
    pad = base.tokenizer.pad_token_id
    out.update(
        base_bytes=base.nbytes,
        adapter_params=sum(p.numel() for p in trainable_parameters(model)),
        rss_loaded_mib=status("VmRSS"),
        hwm_loaded_mib=status("VmHWM"),
        train_blocks=len(data.train),
    )
    if job.get("interleave"):  # step times of several settings, alternating in this one process
        times: dict[str, list[float]] = {name: [] for name, *_ in job["interleave"]}
        for i in range(job["steps"] + 1):  # the first round untimed
            for name, ckpt, chunk, compact in job["interleave"]:
                cfg = TrainConfig(
                    steps=1,
                    seed=i,
                    checkpointing=ckpt,
                    loss_chunk=chunk,
                    compact_heap=compact,
                    progress=False,
                )
                t = train(model, data, cfg, cfg.learning_rate(job["adapter"]), pad, job["quant"]).seconds
                if i:
                    times[name].append(t)
        return {**out, "step_s": {k: statistics.median(v) for k, v in times.items()}, "step_s_all": times}
    cfg = TrainConfig(
        steps=1,
        batch_size=job["micro"],
        grad_accum=job["batch"] // job["micro"],
        checkpointing=job["checkpointing"],
        loss_chunk=job["loss_chunk"],
        compact_heap=job["heap"] == "compact",
        progress=False,
    )
    lr = cfg.learning_rate(job["adapter"])
    train(model, data, cfg, lr, pad, job["quant"])  # untimed: first-call allocations and caches
    times = []
    with PeakRSS() as rss:
        for i in range(job["steps"]):
            step = dataclasses.replace(cfg, seed=i + 1)
            times.append(train(model, data, step, lr, pad, job["quant"]).seconds)
    out.update(step_s=statistics.median(times), step_s_all=times, train_peak_mib=rss.peak)
    out["hwm_train_mib"] = status("VmHWM")
    if job["eval"]:
        with PeakRSS() as rss:
            evaluate(model, data.eval[: job["eval"]], pad, job["quant"], 8, job["loss_chunk"])
        out["eval_peak_mib"] = rss.peak
    out["hwm_mib"] = status("VmHWM")
    return out


def run_job(job: dict) -> dict:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True, text=True, env=env
    )
    if proc.returncode != 0:
        raise SystemExit(f"benchmark worker failed for {job}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare(a: argparse.Namespace, common: dict) -> dict:
    rows = []
    for name, (ckpt, chunk, heap) in SETTINGS.items():
        r = run_job({**common, "micro": a.batch, "checkpointing": ckpt, "loss_chunk": chunk, "heap": heap})
        rows.append({"setting": name, **r})
        print(
            f"  measured {name}: {r['step_s']:.2f} s/step, peak {r['hwm_mib']:.0f} MiB",
            file=sys.stderr,
            flush=True,
        )
    # Fresh processes, one after another, see whatever else runs on the machine; the same steps alternating
    # in one process see it alike, so their ratios hold even on a busy machine.
    inter = run_job(
        {
            **common,
            "micro": a.batch,
            "heap": "fast",
            # the fast heap only: heaps that an earlier step filled serve a compact-heap step without
            # faulting pages in, so interleaving would hide what the compact heap costs
            "interleave": [[n, c, k, False] for n, (c, k, h) in SETTINGS.items() if h == "fast"],
        }
    )
    for r in rows:
        r["step_s_interleaved"] = inter["step_s"].get(r["setting"])
    by = {r["setting"]: r for r in rows}
    plain = by["plain"]
    print(
        f"\n## Training process on `{a.model}` ({a.quant}, {a.adapter}, batch {a.batch} x {a.block} tokens, "
        f"{a.threads} threads, median of {a.steps} steps)\n"
    )
    print(
        "| setting | process peak RSS (MiB) | vs plain | training peak (MiB) | eval peak (MiB) | "
        "after load (MiB) | step: median (s) | fastest (s) | vs plain | interleaved median (s) | vs plain |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        r["step_s_min"] = min(r["step_s_all"])
        inter_s = r["step_s_interleaved"]
        inter_cells = f"{inter_s:.2f} | {inter_s / plain['step_s_interleaved']:.2f}x" if inter_s else "- | -"
        print(
            f"| {r['setting']} | {r['hwm_mib']:.0f} | {r['hwm_mib'] / plain['hwm_mib']:.2f}x | "
            f"{r['train_peak_mib']:.0f} | {r.get('eval_peak_mib', 0):.0f} | {r['rss_loaded_mib']:.0f} | "
            f"{r['step_s']:.2f} | {r['step_s_min']:.2f} | {r['step_s_min'] / min(plain['step_s_all']):.2f}x | "
            f"{inter_cells} |"
        )
    room = DEVICE_MIB - SUPERNODE_MIB
    print("\n| target | measured | met |\n|---|---|---|")
    for name in ("both", "both, compact heap"):
        for ref in ("plain", "chunked CE"):  # without checkpointing: all logits, and chunked as in "both"
            for how, key in (("interleaved median", "step_s_interleaved"), ("fastest", "step_s_min")):
                b, r = by[name][key], by[ref][key]
                if b is None:
                    continue
                print(
                    f"| step of {name} <= {MAX_STEP_RATIO}x the step of {ref} (no checkpointing; {how}) | "
                    f"{b:.2f} vs {r:.2f} s = {b / r:.2f}x | {'yes' if b / r <= MAX_STEP_RATIO else 'no'} |"
                )
    for name in ("both", "both, compact heap"):
        peak = by[name]["hwm_mib"]
        print(
            f"| {name}: training process <= {room} MiB ({DEVICE_MIB} MiB device less {SUPERNODE_MIB} MiB "
            f"SuperNode) | {peak:.0f} MiB | {'yes' if peak <= room else 'no'} |"
        )
    return {"settings": rows, "interleaved": inter}


def calibrate(a: argparse.Namespace, common: dict) -> dict:
    """Peak RSS per micro-batch and setting, for the memory model in fedpeft/model/memory.py."""
    rows = []
    micros = [m for m in (1, 2, 4, 8) if a.batch % m == 0 and m <= a.batch]
    print(
        f"\n{a.heap} heap\n\n| model | micro-batch | checkpointing | loss chunk | runtime | load peak | after load | "
        "training peak | process peak |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name in a.settings.split(","):
        ckpt, chunk, _ = SETTINGS[name]
        heap = a.heap
        for m in micros:
            job = {"micro": m, "checkpointing": ckpt, "loss_chunk": chunk, "heap": heap, "eval": 0}
            r = run_job({**common, **job})
            rows.append(r)
            print(
                f"| {a.model} | {m} | {ckpt} | {chunk} | {r['rss_imports_mib']:.0f} | "
                f"{r['hwm_loaded_mib']:.0f} | {r['rss_loaded_mib']:.0f} | {r['train_peak_mib']:.0f} | "
                f"{r['hwm_mib']:.0f} |",
                flush=True,
            )
    return {"calibration": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--quant", default="nf4")
    p.add_argument("--adapter", default="lora")
    p.add_argument("--data", default="default")
    p.add_argument("--user", default="barack-obama")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--steps", type=int, default=5, help="timed steps per setting (median reported)")
    p.add_argument("--eval-blocks", type=int, default=16, help="held-out blocks evaluated (0: none)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--calibrate", action="store_true", help="sweep the micro-batch instead")
    p.add_argument(
        "--settings", default="both,checkpointing,chunked CE,plain", help="which settings --calibrate sweeps"
    )
    p.add_argument("--heap", default="compact", choices=["fast", "compact"], help="--calibrate's heap")
    p.add_argument("--json", default=None, help="default: benchmarks/results/memory[-calibrate].json")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(json.loads(a.worker))))
        return
    common = {
        k: getattr(a, k)
        for k in (
            "model",
            "quant",
            "adapter",
            "data",
            "user",
            "cache_dir",
            "batch",
            "block",
            "steps",
            "threads",
        )
    }
    common["eval"] = a.eval_blocks
    result = calibrate(a, common) if a.calibrate else compare(a, common)
    path = Path(a.json or f"benchmarks/results/memory{'-calibrate' if a.calibrate else ''}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"args": vars(a), **result}, indent=2) + "\n")


if __name__ == "__main__":
    main()
