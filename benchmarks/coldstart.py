"""Cold start of a device: converting the packaged GGUF base, then loading it quantized, before and after
the cache kept pre-quantized copies (fedpeft.model.cache: quantized_dir, prepare_quantized).

Every step runs in a fresh subprocess, one at a time, on an empty FEDPEFT_CACHE per repeat:
  convert  before: transformers' plain path as fedpeft did it (fp32 load, parse the GGUF 3 times, .to(bf16), save)
           after:  fedpeft.model.gguf.convert_gguf (GGUF read once, bf16 straight away) + the nf4 pre-quantized copy
  load     before: the bf16 folder, quantized by bitsandbytes at load (the bf16 copy materializes first)
           after:  load_base reading the pre-quantized copy (first load after the conversion, then a second);
                   and load_base where no copy exists yet (a --model FOLDER, another quant): quantize + write
Seconds are for the call itself (imports are done first and reported apart); peak RSS is the process's
VmHWM over the call (reset just before it through /proc/self/clear_refs), and "RSS before" what the
imports alone hold. Each worker also returns the sha256 of the bf16 folder's tensors and the base's
fingerprint, and the run checks that both paths agree on them.

    python benchmarks/coldstart.py                 # all cores, then 1 thread; 3 repeats each (~7 min on 2 cores)
    python benchmarks/coldstart.py --repeats 1 --threads 2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.core import status  # noqa: E402

QUANT = "nf4"


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset VmHWM to the current RSS (Linux >= 4.0)
        f.write("5")


def _tensor_digest(folder: Path) -> str:
    import torch
    from safetensors import safe_open

    h = hashlib.sha256()
    with safe_open(folder / "model.safetensors", "pt") as f:
        for key in sorted(f.keys()):
            t = f.get_tensor(key).contiguous()
            h.update(f"{key}|{tuple(t.shape)}|{t.dtype}|".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _old_convert(gguf: Path, cache: Path) -> Path:
    """fedpeft.model.gguf.convert_gguf as it was before the pre-quantized store (git 50bdbc7)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedpeft.atomic import atomic_dir
    from fedpeft.model.cache import file_sha256

    dest = cache / f"{gguf.stem}-{file_sha256(gguf)[:12]}"
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model = model.to(torch.bfloat16)
    with atomic_dir(dest) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return dest


def worker(job: dict) -> dict:
    t0 = time.perf_counter()
    import warnings

    warnings.filterwarnings("ignore")
    import bitsandbytes  # noqa: F401  (imports done before timing: both paths need the same ones)
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM  # noqa: F401

    import fedpeft.model.base as fb
    from fedpeft.config.tree import BaseConfig
    from fedpeft.model.cache import prepare_quantized
    from fedpeft.model.fingerprint import fingerprint
    from fedpeft.model.gguf import convert_gguf, default_gguf_path
    from fedpeft.model.quant import load_model, quiet_base_libraries

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    quiet_base_libraries()
    torch.set_num_threads(job["threads"])
    cache = Path(job["cache"])
    out: dict = {
        "step": job["step"],
        "import_s": time.perf_counter() - t0,
        "rss_before_mib": status("VmRSS"),
    }
    _reset_peak()
    cpu, t = os.times(), time.perf_counter()
    if job["step"] == "convert-before":
        folder = _old_convert(default_gguf_path(), cache)
    elif job["step"] == "convert-after":
        folder = convert_gguf(default_gguf_path(), str(cache), prequantize=())
        out["convert_only_s"] = time.perf_counter() - t
        prepare_quantized(folder, QUANT, str(cache))
    elif job["step"] == "load-before":  # load_base as it was: quantize the bf16 folder at load
        folder = fb.resolve_base_dir("default", str(cache))
        model = load_model(folder, QUANT)
        fb._load_tokenizer(folder)
        out["fingerprint"] = fingerprint(model, QUANT)
    else:  # load-write: load_base writing the copy; load-first/-second: load_base reading it
        base = fb.load_base(BaseConfig(model="default", quant=QUANT, cache_dir=str(cache)))
        folder = base.path
        out.update(fingerprint=base.fingerprint, prequantized=base.prequantized)
    out["seconds"] = time.perf_counter() - t
    out["cpu_s"] = sum(os.times()[:2]) - sum(cpu[:2])  # user + system, all threads
    out["peak_rss_mib"] = status("VmHWM")
    out["load_average"] = os.getloadavg()[0]
    if job["step"].startswith("convert"):
        out["tensor_digest"] = _tensor_digest(folder)
    return out


def run_job(job: dict) -> dict:
    env = {**os.environ, "FEDPEFT_CACHE": job["cache"], "TOKENIZERS_PARALLELISM": "false"}
    t = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True, text=True, env=env
    )
    if proc.returncode != 0:
        raise SystemExit(f"benchmark worker failed for {job}:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - t
    print(
        f"  {job['step']:15} {result['seconds']:6.2f} s  peak {result['peak_rss_mib']:5.0f} MiB "
        f"(imports {result['import_s']:.1f} s, {result['rss_before_mib']:.0f} MiB; load average "
        f"{result['load_average']:.1f})",
        file=sys.stderr,
        flush=True,
    )
    return result


def measure(threads: int, repeats: int) -> dict:
    """`repeats` cold starts with torch using `threads` threads; medians, checks and every run."""
    runs: list[dict[str, dict]] = []
    loads = [os.getloadavg()[0]]
    for r in range(repeats):
        print(f"{threads} thread(s), repeat {r + 1}/{repeats}", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory(prefix="coldstart-") as tmp:
            before, after = Path(tmp) / "before", Path(tmp) / "after"
            jobs = [
                ("convert-before", before),
                ("load-before", before),
                ("load-write", before),  # load_base on a cache without the copy: quantize, then write it
                ("convert-after", after),
                ("load-first", after),
                ("load-second", after),
            ]
            run = {}
            for step, cache in jobs:
                cache.mkdir(exist_ok=True)
                run[step] = run_job({"step": step, "cache": str(cache), "threads": threads})
            runs.append(run)
            shutil.rmtree(tmp, ignore_errors=True)
        loads.append(os.getloadavg()[0])

    digests = {run[s]["tensor_digest"] for run in runs for s in ("convert-before", "convert-after")}
    loaded = ("load-before", "load-write", "load-first", "load-second")
    prints = {run[s]["fingerprint"] for run in runs for s in loaded}
    pre = all(run[s]["prequantized"] for run in runs for s in ("load-first", "load-second"))
    pre = pre and not any(run["load-write"]["prequantized"] for run in runs)

    def med(step: str, key: str) -> float:
        return statistics.median(run[step][key] for run in runs)

    first_before = statistics.median(
        run["convert-before"]["seconds"] + run["load-before"]["seconds"] for run in runs
    )
    first_after = statistics.median(
        run["convert-after"]["seconds"] + run["load-first"]["seconds"] for run in runs
    )
    rows = [
        ("conversion (s)", med("convert-before", "seconds"), med("convert-after", "seconds")),
        (
            "  of which GGUF to bf16 (s)",
            med("convert-before", "seconds"),
            med("convert-after", "convert_only_s"),
        ),
        ("first load (s)", med("load-before", "seconds"), med("load-first", "seconds")),
        ("first round: conversion + first load (s)", first_before, first_after),
        ("second load (s)", med("load-before", "seconds"), med("load-second", "seconds")),
        (
            "load, no copy yet: quantize + write it (s)",
            med("load-before", "seconds"),
            med("load-write", "seconds"),
        ),
        (
            "load peak RSS, VmHWM (MiB)",
            med("load-before", "peak_rss_mib"),
            med("load-second", "peak_rss_mib"),
        ),
        (
            "conversion peak RSS, VmHWM (MiB)",
            med("convert-before", "peak_rss_mib"),
            med("convert-after", "peak_rss_mib"),
        ),
        ("imports before a load (s)", med("load-before", "import_s"), med("load-second", "import_s")),
        ("load process, wall (s)", med("load-before", "process_s"), med("load-second", "process_s")),
    ]
    return {
        "threads": threads,
        "repeats": repeats,
        "load_average": loads,
        "table": [{"what": n, "before": b, "after": f, "ratio": f / b} for n, b, f in rows],
        "first_round_s": {"before": first_before, "after": first_after},
        "first_round_target_met": first_after <= 10,
        "tensors_identical": len(digests) == 1,
        "fingerprints_identical": len(prints) == 1,
        "prequantized_loads": pre,
        "runs": runs,
    }


def report(m: dict) -> None:
    loads = m["load_average"]
    print(
        f"\n## Cold start of the default base ({QUANT}, torch on {m['threads']} thread(s), median of "
        f"{m['repeats']}; 1-min load average {min(loads):.1f}-{max(loads):.1f})\n"
    )
    print(
        "| | before: bf16, quantize at load | after: pre-quantized copy | after / before |\n|---|---|---|---|"
    )
    for row in m["table"]:
        print(f"| {row['what']} | {row['before']:.2f} | {row['after']:.2f} | {row['ratio']:.2f}x |")
    first = m["first_round_s"]
    print(
        f"\nfirst round <= 10 s: {'yes' if m['first_round_target_met'] else 'no'} "
        f"({first['after']:.1f} s, before {first['before']:.1f} s)"
    )
    print(
        f"bf16 tensors identical before/after: {m['tensors_identical']}; "
        f"one fingerprint on all loads: {m['fingerprints_identical']}; "
        f"loads after the conversion read the pre-quantized copy: {m['prequantized_loads']}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--threads",
        default=f"{os.cpu_count() or 1},1",
        help="torch thread counts to measure, comma-separated (default: all cores, then 1: bitsandbytes' "
        "CPU quantization on all cores slows down several-fold when another process shares them)",
    )
    p.add_argument("--json", default="benchmarks/results/coldstart.json")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(json.loads(a.worker))))
        return
    results = [measure(int(t), a.repeats) for t in a.threads.split(",")]
    for m in results:
        report(m)
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    args = {k: v for k, v in vars(a).items() if k != "worker"}
    Path(a.json).write_text(json.dumps({"args": args, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
