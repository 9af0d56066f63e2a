"""Serving benchmark: `fedpeft serve` on the default model (--quant auto), measured from real HTTP clients,
this checkout's server side by side with the one of --baseline (a git revision: by default the engine before
the batched adapter operator: peft's mixed batch, static batches), in one run.

- Throughput and latency: 1, 4 and 16 concurrent completion requests (greedy, --tokens each), all for one
  adapter or each for a different one of 16 (--max-batch 16). Each cell is the median of --repeats waves;
  tokens/s counts the tokens of a wave over its wall time.
- Arrivals: --arrivals requests (--arrival-tokens each, four adapters in turn) sent at a steady rate, at
  0.5 to 3 requests per idle latency of the baseline's server (the same rates for both); each engine's median
  latency against its own idle single-request latency (continuous batching against static batches).
- Memory: this server's resident memory (VmRSS, once it answers) with 1 and with 50 loaded LoRA r=8 adapters,
  against one adapter's size.

The adapters have random weights (serving cost does not depend on how they were trained). Servers run one at
a time (2 cores).

    python benchmarks/serve.py                       # ~20 min on 2 cores
    python benchmarks/serve.py --model tiny --tokens 4 --repeats 1 --adapters 4 --arrivals 4   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS = [
    "My fellow Americans, tonight I want to talk about",
    "The economy of the United States depends on",
    "Our schools and our teachers deserve",
    "Health care in this country should be",
]


def write_adapters(root: Path, model: str, count: int) -> list[Path]:
    from fedpeft.config.tree import AdapterConfig, BaseConfig
    from fedpeft.model.adapters import inject, load_adapter_state, save_adapter
    from fedpeft.model.base import load_base
    from tests.serve.runs import random_arrays

    base = load_base(BaseConfig(model=model))
    cfg = AdapterConfig()
    peft_model = inject(base, cfg)
    paths = []
    for i in range(count):
        load_adapter_state(peft_model, random_arrays(peft_model, i, 0.02))
        paths.append(save_adapter(peft_model, base, cfg, root / f"a{i}"))
    return paths


class Server:
    def __init__(self, adapters: list[Path], *flags: str, root: Path = ROOT) -> None:
        """`fedpeft serve` from the checkout at `root` (this one, or the baseline's worktree)."""
        cmd = [sys.executable, "-m", "fedpeft.cli", "serve", "--port", "0"]
        for i, p in enumerate(adapters):
            cmd += ["--adapter", f"a{i}={p}"]
        env = {**os.environ, "PYTHONPATH": str(root)}
        self.proc = subprocess.Popen(
            [*cmd, *flags], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=root, env=env
        )
        for line in self.proc.stdout:
            if " at http" in line:
                self.url = line.split(" at ")[1].split(";")[0].strip()
                break
        else:
            raise SystemExit("fedpeft serve did not start")
        import httpx

        for _ in range(300):
            try:
                httpx.get(self.url.removesuffix("/v1") + "/health")
                break
            except httpx.TransportError:
                time.sleep(0.1)

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


def wave(url: str, models: list[str], tokens: int) -> tuple[float, list[float], int, list[str]]:
    """All requests at once; (wall seconds, per-request latencies, tokens generated, texts)."""
    start = time.perf_counter()
    with ThreadPoolExecutor(len(models)) as pool:
        results = list(
            pool.map(lambda i: one(url, models[i], PROMPTS[i % len(PROMPTS)], tokens), range(len(models)))
        )
    wall = time.perf_counter() - start
    return wall, [r[0] for r in results], sum(r[1] for r in results), [r[2] for r in results]


def one(url: str, model: str, prompt: str, tokens: int) -> tuple[float, int, str]:
    import httpx

    body = {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0}
    start = time.perf_counter()
    r = httpx.post(url + "/completions", json=body, timeout=600)
    r.raise_for_status()
    return time.perf_counter() - start, r.json()["usage"]["completion_tokens"], r.json()["choices"][0]["text"]


def arrivals(url: str, rate: float, count: int, tokens: int) -> list[float]:
    """`count` requests sent `1/rate` seconds apart (four adapters in turn); each one's latency."""
    with ThreadPoolExecutor(count) as pool:
        futures = []
        start = time.perf_counter()
        for i in range(count):
            time.sleep(max(0.0, start + i / rate - time.perf_counter()))
            futures.append(pool.submit(one, url, f"a{i % 4}", PROMPTS[i % len(PROMPTS)], tokens))
        return [f.result()[0] for f in futures]


RATE_STEPS = (
    0.5,
    0.75,
    1.0,
    1.5,
    2.0,
    3.0,
)  # arrival rates, in requests per idle latency of the first engine


def arrival_rows(
    server: Server, mode: str, args: argparse.Namespace, grid: list[float]
) -> list[dict[str, Any]]:
    """Latency under steady arrivals at the rates of `grid` (filled from this engine's idle latency when
    empty: the first engine's sets the rates both are measured at)."""
    idle = statistics.median(
        one(server.url, "a0", PROMPTS[0], args.arrival_tokens)[0] for _ in range(args.repeats)
    )
    if not grid:
        grid += [step / idle for step in RATE_STEPS]
    rows = []
    for rate in grid:
        latencies = arrivals(server.url, rate, args.arrivals, args.arrival_tokens)
        median = statistics.median(latencies)
        rows.append(
            {
                "mode": mode,
                "rate_per_s": rate,
                "idle_latency_s": idle,
                "median_latency_s": median,
                "latency_x_idle": median / idle,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def throughput(adapters: list[Path], args: argparse.Namespace, baseline: Path | None) -> tuple[list, list]:
    rows: list[dict[str, Any]] = []
    timing: list[dict[str, Any]] = []
    # the baseline first: its idle latency sets the arrival rates both engines are measured at
    engines = ([(f"baseline {args.baseline}", baseline)] if baseline else []) + [("this checkout", ROOT)]
    grid: list[float] = []
    for mode, root in engines:
        server = Server(adapters[:16], "--max-batch", "16", root=root)
        try:
            wave(server.url, ["a0"], 4)  # warm-up
            for concurrency in (1, 4, 16):
                for spread in (1, 16) if concurrency > 1 else (1,):
                    models = [f"a{i % min(spread, len(adapters))}" for i in range(concurrency)]
                    runs = [wave(server.url, models, args.tokens) for _ in range(args.repeats)]
                    wall = statistics.median(r[0] for r in runs)
                    rows.append(
                        {
                            "mode": mode,
                            "concurrent": concurrency,
                            "adapters": len(set(models)),
                            "tokens_per_s": statistics.median(r[2] / r[0] for r in runs),
                            "median_latency_s": statistics.median(lat for r in runs for lat in r[1]),
                            "wave_s": wall,
                            "texts": runs[0][3],
                        }
                    )
                    print(json.dumps(rows[-1]), flush=True)
            timing += arrival_rows(server, mode, args, grid)
        finally:
            server.stop()
    return rows, timing


def memory(adapters: list[Path]) -> dict[str, Any]:
    out: dict[str, Any] = {"adapter_bytes": (adapters[0] / "adapter_model.safetensors").stat().st_size}
    for n in (1, len(adapters)):
        server = Server(adapters[:n])
        try:
            wave(server.url, ["a0"], 4)
            out[f"rss_mib_{n}"] = server.rss_mib()
        finally:
            server.stop()
        print(json.dumps(out), flush=True)
    n = len(adapters)
    out["per_extra_adapter_mib"] = (out[f"rss_mib_{n}"] - out["rss_mib_1"]) / (n - 1)
    out["per_extra_vs_size"] = out["per_extra_adapter_mib"] * 2**20 / out["adapter_bytes"]
    return out


def table(rows: list[dict[str, Any]], timing: list[dict[str, Any]], mem: dict[str, Any], n: int) -> str:
    lines = [
        "| engine | concurrent | adapters | tok/s | median latency (s) | tok/s vs 1 adapter |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        same = next(
            x for x in rows if (x["mode"], x["concurrent"], x["adapters"]) == (r["mode"], r["concurrent"], 1)
        )
        lines.append(
            f"| {r['mode']} | {r['concurrent']} | {r['adapters']} | {r['tokens_per_s']:.1f} | "
            f"{r['median_latency_s']:.2f} | {r['tokens_per_s'] / same['tokens_per_s']:.0%} |"
        )
    lines += [
        "",
        "| engine | arrivals (req/s) | median latency (s) | x its idle latency |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {t['mode']} | {t['rate_per_s']:.2f} | {t['median_latency_s']:.2f} | {t['latency_x_idle']:.2f}x |"
        for t in timing
    ]
    lines += [
        "",
        "| loaded adapters | server RSS (MiB) |",
        "|---|---|",
        f"| 1 | {mem['rss_mib_1']:.0f} |",
        f"| {n} | {mem[f'rss_mib_{n}']:.0f} |",
        "",
        f"Each extra adapter: {mem['per_extra_adapter_mib']:.2f} MiB resident, its file "
        f"{mem['adapter_bytes'] / 2**20:.2f} MiB ({mem['per_extra_vs_size']:.2f}x its size).",
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--adapters", type=int, default=50, help="loaded for the memory figure")
    p.add_argument("--arrivals", type=int, default=24, help="requests per arrival rate")
    p.add_argument("--arrival-tokens", type=int, default=16)
    p.add_argument(
        "--baseline",
        default="389c362",
        help="git revision whose server runs beside this one ('' for none); default: before the operator",
    )
    p.add_argument("--json", default="benchmarks/results/serve.json")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        baseline = None
        if args.baseline:
            baseline = Path(tmp) / "baseline"
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "add", "-f", "--detach", str(baseline), args.baseline],
                check=True,
                capture_output=True,
            )
        try:
            adapters = write_adapters(Path(tmp), args.model, max(args.adapters, 16))
            rows, timing = throughput(adapters, args, baseline)
            mem = memory(adapters[: args.adapters])
        finally:
            if baseline:
                subprocess.run(
                    ["git", "-C", str(ROOT), "worktree", "remove", "-f", str(baseline)], check=False
                )
    print(table(rows, timing, mem, args.adapters))
    Path(args.json).write_text(
        json.dumps({"args": vars(args), "throughput": rows, "arrivals": timing, "memory": mem}, indent=2)
        + "\n"
    )


if __name__ == "__main__":
    main()
