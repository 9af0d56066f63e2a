"""Core benchmark: one device's local step on the shared base, per quantization, side by side in one run.

For each (adapter, quant) a fresh subprocess loads the base, so peak RSS is that configuration's own:
  - step time: median over --steps timed optimizer steps (after --warmup untimed ones), batch 4 x 128;
  - peak RSS while training (sampled from /proc every 5 ms) and over the whole process (ru_maxrss);
  - adapter size in bytes and as a fraction of the base's in-memory bytes;
then held-out perplexity before/after --ppl-steps local steps on one user, for LoRA and IA3 on nf4.
With --compute, instead: the compute dtype (--compute-dtype fp32, bf16 and auto) side by side on the
default stored base, a LoRA training step and an evaluation pass of one user's held-out text each, on this
CPU and (--emulate-avx2) on this CPU restricted to AVX2 (ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2:
what a CPU without AVX-512 runs), with the target: auto within 10% of the faster of fp32 and bf16.
Prints markdown tables and the target ratios; writes everything to --json.

    python benchmarks/core.py                      # the real default model (~10 min on 2 cores)
    python benchmarks/core.py --model tiny --steps 2 --ppl-steps 2   # a smoke run
    python benchmarks/core.py --compute --emulate-avx2 --json benchmarks/results/compute.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path


def status(key: str) -> float:
    """A /proc/self/status field in MiB (VmRSS: resident now, VmHWM: the process's peak so far)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def _rss_mib() -> float:
    return status("VmRSS")


class PeakRSS:
    """Samples this process's resident set size in a thread; .peak is the max seen since start()."""

    def __init__(self, every: float = 0.005) -> None:
        self.every, self.peak, self._stop = every, 0.0, threading.Event()

    def __enter__(self) -> PeakRSS:
        self.peak = _rss_mib()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_mib())
            time.sleep(self.every)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mib())


def worker(job: dict) -> dict:
    """One configuration in this (fresh) process."""
    import torch

    from fedpeft.config.tree import AdapterConfig, BaseConfig, DataConfig, TrainConfig
    from fedpeft.data.blocks import load_user_data
    from fedpeft.model.adapters import adapter_state, inject
    from fedpeft.model.base import load_base
    from fedpeft.training.local import evaluate, train

    torch.set_num_threads(job["threads"])
    t0 = time.perf_counter()
    base = load_base(
        BaseConfig(model=job["model"], quant=job["quant"], compute_dtype=job.get("compute", "auto"))
    )
    load_s = time.perf_counter() - t0
    data, _ = load_user_data(DataConfig(block_size=128), base.tokenizer, job["user"])
    model = inject(base, AdapterConfig(kind=job["adapter"]))
    pad = base.tokenizer.pad_token_id
    lr = TrainConfig().learning_rate(job["adapter"])
    out = {
        **job,
        "load_s": load_s,
        "base_bytes": base.nbytes,
        "adapter_bytes": sum(v.nbytes for v in adapter_state(model).values()),
        "rss_after_load_mib": _rss_mib(),
        "precision": base.precision.metrics(),
    }
    compute = base.compute
    if job["mode"] in ("speed", "compute"):
        if job["warmup"]:
            train(
                model, data, TrainConfig(steps=job["warmup"], batch_size=4, progress=False), lr, pad, compute
            )
        times = []
        with PeakRSS() as rss:
            for i in range(job["steps"]):
                step = TrainConfig(steps=1, batch_size=4, seed=i + 1, progress=False)
                times.append(train(model, data, step, lr, pad, compute).seconds)
        out.update(step_s=statistics.median(times), step_s_all=times, train_peak_rss_mib=rss.peak)
    if job["mode"] == "compute":  # an evaluation pass over the user's first held-out blocks, the fastest
        passes = []
        for _ in range(job["eval_passes"]):
            t = time.perf_counter()
            result = evaluate(model, data.eval[: job["eval_blocks"]], pad, compute, progress=False)
            passes.append(time.perf_counter() - t)
        out.update(eval_s=min(passes), eval_tokens=result.tokens, eval_loss=result.loss)
    elif job["mode"] == "ppl":
        before = evaluate(model, data.eval, pad, compute)
        result = train(
            model, data, TrainConfig(steps=job["steps"], batch_size=4, progress=False), lr, pad, compute
        )
        after = evaluate(model, data.eval, pad, compute)
        out.update(
            ppl_before=before.ppl, ppl_after=after.ppl, eval_tokens=after.tokens, train_s=result.seconds
        )
    out["max_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


AVX2_ONLY = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}  # what a CPU without AVX-512 runs


def run_job(job: dict) -> dict:
    env = {**os.environ, **(AVX2_ONLY if job.get("cpu") == "avx2" else {})}
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True, text=True, env=env
    )
    if proc.returncode != 0:
        raise SystemExit(f"benchmark worker failed for {job}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--quants", default="none,bf16,int8,nf4")
    p.add_argument("--adapters", default="lora,ia3")
    p.add_argument("--user", default="barack-obama")
    p.add_argument("--steps", type=int, default=6, help="timed steps per configuration (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--ppl-steps", type=int, default=50)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--json", default="benchmarks/results/core.json")
    p.add_argument("--compute", action="store_true", help="compare --compute-dtype fp32, bf16 and auto")
    p.add_argument(
        "--emulate-avx2", action="store_true", help="with --compute: also on this CPU as AVX2-only"
    )
    p.add_argument("--repeats", type=int, default=2, help="with --compute: runs of each setting (medians)")
    p.add_argument("--eval-blocks", type=int, default=8, help="with --compute: held-out blocks a pass scores")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(json.loads(a.worker))))
        return
    if a.compute:
        compute_main(a)
        return

    common = {"model": a.model, "user": a.user, "threads": a.threads, "warmup": a.warmup}
    speed = []
    for adapter in a.adapters.split(","):
        for quant in a.quants.split(","):
            r = run_job({**common, "adapter": adapter, "quant": quant, "mode": "speed", "steps": a.steps})
            speed.append(r)
            print(f"  measured {adapter} {quant}: {r['step_s']:.2f} s/step", file=sys.stderr, flush=True)
    quality = [
        run_job({**common, "adapter": adapter, "quant": "nf4", "mode": "ppl", "steps": a.ppl_steps})
        for adapter in a.adapters.split(",")
    ]

    print(
        f"\n## Local step on `{a.model}` (batch 4 x 128 tokens, {a.threads} threads, median of {a.steps} steps)\n"
    )
    print(
        "| adapter | quant | step (s) | train peak RSS (MiB) | base in memory (MiB) | adapter (bytes) | adapter / base |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in speed:
        print(
            f"| {r['adapter']} | {r['quant']} | {r['step_s']:.2f} | {r['train_peak_rss_mib']:.0f} | "
            f"{r['base_bytes'] / 2**20:.0f} | {r['adapter_bytes']:,} | {r['adapter_bytes'] / r['base_bytes']:.2%} |"
        )
    print("\n| adapter | target | measured | ratio | target met |\n|---|---|---|---|---|")
    for adapter in a.adapters.split(","):
        by = {r["quant"]: r for r in speed if r["adapter"] == adapter}
        if {"none", "nf4"} <= by.keys():
            ratio = by["nf4"]["train_peak_rss_mib"] / by["none"]["train_peak_rss_mib"]
            print(
                f"| {adapter} | nf4 peak RSS <= 0.6x fp32 | {by['nf4']['train_peak_rss_mib']:.0f} vs "
                f"{by['none']['train_peak_rss_mib']:.0f} MiB | {ratio:.2f}x | {'yes' if ratio <= 0.6 else 'no'} |"
            )
        if {"bf16", "nf4"} <= by.keys():
            ratio = by["nf4"]["step_s"] / by["bf16"]["step_s"]
            print(
                f"| {adapter} | nf4 step <= 1.3x bf16 | {by['nf4']['step_s']:.2f} vs {by['bf16']['step_s']:.2f} s "
                f"| {ratio:.2f}x | {'yes' if ratio <= 1.3 else 'no'} |"
            )
    print(
        f"\n## Held-out perplexity of user `{a.user}`, nf4 base, before / after {a.ppl_steps} local steps\n"
    )
    print("| adapter | before | after | change | train time (s) |\n|---|---|---|---|---|")
    for r in quality:
        print(
            f"| {r['adapter']} | {r['ppl_before']:.2f} | {r['ppl_after']:.2f} | "
            f"{r['ppl_after'] / r['ppl_before'] - 1:+.1%} | {r['train_s']:.0f} |"
        )
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(
        json.dumps({"args": vars(a), "speed": speed, "quality": quality}, indent=2) + "\n"
    )


def compute_main(a: argparse.Namespace) -> None:
    """fp32, bf16 and auto side by side: each setting in a fresh process, --repeats times, interleaved."""
    cpus = ["native", "avx2"] if a.emulate_avx2 else ["native"]
    common = {"model": a.model, "user": a.user, "threads": a.threads, "eval_blocks": a.eval_blocks}
    runs: dict[tuple[str, str], list[dict]] = {}
    for repeat in range(a.repeats):
        for cpu in cpus:
            for compute in ("fp32", "bf16", "auto"):
                if repeat and cpu == "avx2" and compute == "bf16":
                    continue  # minutes a run, and 20x+ off the others: once is enough
                job = {**common, "adapter": "lora", "quant": "auto", "mode": "compute", "compute": compute}
                # bf16 without native support runs ~50x slower: one step and one pass show it
                slow = cpu == "avx2" and compute == "bf16"
                timing = (
                    {"warmup": 0, "steps": 1, "eval_passes": 1}
                    if slow
                    else {"warmup": a.warmup, "steps": a.steps, "eval_passes": 2}
                )
                r = run_job({**job, **timing, "cpu": cpu})
                runs.setdefault((cpu, compute), []).append(r)
                print(
                    f"  {cpu} {compute} ({r['precision']['dtype']}): step {r['step_s']:.2f} s, "
                    f"eval {r['eval_s']:.2f} s",
                    file=sys.stderr,
                    flush=True,
                )
    print(
        f"\n## Compute dtype on `{a.model}` (LoRA, batch 4 x 128, {a.threads} threads, medians of {a.repeats} runs)\n"
    )
    print(
        "| CPU | capability | --compute-dtype | computes in | step (s) | eval pass (s) | eval loss | auto within 10% |"
    )
    print("|---|---|---|---|---|---|---|---|")
    summary = []
    for cpu in cpus:
        med = {
            c: {k: statistics.median(r[k] for r in runs[(cpu, c)]) for k in ("step_s", "eval_s", "eval_loss")}
            for c in ("fp32", "bf16", "auto")
        }
        best = {k: min(med["fp32"][k], med["bf16"][k]) for k in ("step_s", "eval_s")}
        ratio = {k: med["auto"][k] / best[k] for k in best}
        met = all(v <= 1.10 for v in ratio.values())
        cap = runs[(cpu, "auto")][0]["precision"]["capability"]
        for c in ("fp32", "bf16", "auto"):
            chosen = runs[(cpu, c)][0]["precision"]["dtype"]
            verdict = (
                f"step {ratio['step_s']:.2f}x, eval {ratio['eval_s']:.2f}x: {'yes' if met else 'no'}"
                if c == "auto"
                else ""
            )
            print(
                f"| {cpu} | {cap} | {c} | {chosen} | {med[c]['step_s']:.2f} | {med[c]['eval_s']:.2f} | "
                f"{med[c]['eval_loss']:.4f} | {verdict} |"
            )
        summary.append(
            {"cpu": cpu, "capability": cap, "medians": med, "auto_over_best": ratio, "target_met": met}
        )
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    flat = {f"{cpu}/{c}": rs for (cpu, c), rs in runs.items()}
    Path(a.json).write_text(json.dumps({"args": vars(a), "summary": summary, "runs": flat}, indent=2) + "\n")


if __name__ == "__main__":
    main()
