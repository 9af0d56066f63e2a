"""The README's main command on two kinds of CPU, side by side in one run: this CPU as it is, and this CPU
restricted to AVX2 (ATEN_CPU_CAPABILITY=avx2 for torch's own kernels, ONEDNN_MAX_CPU_ISA=AVX2 for oneDNN's
matmuls: what a CPU without AVX-512, hence without native bf16, runs). Each run is a fresh `fedpeft
simulate` with every option at its default (plus any --extra flags), timed as a whole process.

Prints each run's wall time, what its clients computed in, round 0's and the last round's held-out
perplexity, and the targets of "compute precision chosen by the CPU": the AVX2 run within 1.5x of the
native one's time, and its held-out perplexity within 0.5%. Writes everything to --json.

    python benchmarks/cpu_kinds.py                                   # ~30 min on 2 cores
    python benchmarks/cpu_kinds.py --extra "--rounds 1" --json /tmp/quick.json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

AVX2_ONLY = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def run(cpu: str, extra: list[str], out: Path) -> dict:
    env = {**os.environ, **(AVX2_ONLY if cpu == "avx2" else {})}
    cmd = [sys.executable, "-m", "fedpeft.cli", "simulate", "--out", str(out), "--no-progress", *extra]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{cpu} run failed:\n{proc.stderr[-3000:]}")
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first, last = history[0], history[-1]
    computes = sorted({c["dtype"] for c in first.get("compute", {}).values()})
    why = sorted({c["why"] for c in first.get("compute", {}).values()})
    return {
        "cpu": cpu,
        "seconds": seconds,
        "compute": computes,
        "why": why,
        "ppl_round0": first["eval_ppl"],
        "ppl_last": last["eval_ppl"],
        "round_seconds": [h.get("seconds") for h in history[1:]],
        "stderr_tail": proc.stderr[-2000:],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--extra", default="", help='flags added to both runs, e.g. "--rounds 1"')
    p.add_argument("--json", default="benchmarks/results/cpu-kinds.json")
    a = p.parse_args()
    extra = shlex.split(a.extra)
    results = []
    with tempfile.TemporaryDirectory(prefix="fedpeft-cpu-kinds-") as tmp:
        for cpu in ("native", "avx2"):  # one at a time: two would share the 2 cores
            r = run(cpu, extra, Path(tmp) / cpu)
            results.append(r)
            print(f"  {cpu}: {r['seconds']:.0f} s, {r['compute']}", file=sys.stderr, flush=True)
    native, avx2 = results
    print("\n| CPU | clients computed in | why | wall time | round 0 ppl | last round ppl |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['cpu']} | {', '.join(r['compute'])} | {'; '.join(r['why'])} | {r['seconds'] / 60:.1f} min | "
            f"{r['ppl_round0']:.2f} | {r['ppl_last']:.2f} |"
        )
    time_ratio = avx2["seconds"] / native["seconds"]
    ppl_gap = avx2["ppl_last"] / native["ppl_last"] - 1
    print("\n| target | measured | met |\n|---|---|---|")
    print(f"| AVX2 time <= 1.5x native | {time_ratio:.2f}x | {'yes' if time_ratio <= 1.5 else 'no'} |")
    print(
        f"| AVX2 last-round ppl within 0.5% | {ppl_gap:+.2%} | {'yes' if abs(ppl_gap) <= 0.005 else 'no'} |"
    )
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(
        json.dumps({"args": vars(a), "runs": results, "time_ratio": time_ratio, "ppl_gap": ppl_gap}, indent=2)
        + "\n"
    )


if __name__ == "__main__":
    main()
