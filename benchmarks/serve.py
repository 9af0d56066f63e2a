"""Serving benchmark: `fedpeft serve` on the default model (bf16, as --quant auto keeps it), measured from real
HTTP clients, side by side in one run.

- Throughput and latency: 1, 4 and 16 concurrent completion requests (greedy, --tokens each), all for one
  adapter or each for a different one of 16, against a server that batches them (--max-batch 16: LoRA
  adapters mixed in one forward) and one that serves one request at a time (--max-batch 1). Each cell is the
  median of --repeats waves; tokens/s counts the tokens of a wave over its wall time.
- Memory: the server process's resident memory (VmRSS, once it answers) with 1 and with 50 loaded LoRA r=8
  adapters, against one adapter's size.

The adapters have random weights (serving cost does not depend on how they were trained). Servers run one at
a time (2 cores).

    python benchmarks/serve.py                       # ~10 min on 2 cores
    python benchmarks/serve.py --model tiny --tokens 4 --repeats 1 --adapters 4   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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
    def __init__(self, adapters: list[Path], *flags: str) -> None:
        cmd = [sys.executable, "-m", "fedpeft.cli", "serve", "--port", "0"]
        for i, p in enumerate(adapters):
            cmd += ["--adapter", f"a{i}={p}"]
        self.proc = subprocess.Popen(
            [*cmd, *flags], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
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
    import httpx

    def one(i: int) -> tuple[float, int, str]:
        body = {
            "model": models[i],
            "prompt": PROMPTS[i % len(PROMPTS)],
            "max_tokens": tokens,
            "temperature": 0,
        }
        start = time.perf_counter()
        r = httpx.post(url + "/completions", json=body, timeout=600)
        r.raise_for_status()
        return (
            time.perf_counter() - start,
            r.json()["usage"]["completion_tokens"],
            r.json()["choices"][0]["text"],
        )

    start = time.perf_counter()
    with ThreadPoolExecutor(len(models)) as pool:
        results = list(pool.map(one, range(len(models))))
    wall = time.perf_counter() - start
    return wall, [r[0] for r in results], sum(r[1] for r in results), [r[2] for r in results]


def throughput(adapters: list[Path], args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for mode, max_batch in (("mixed batches", "16"), ("one at a time", "1")):
        server = Server(adapters[:16], "--max-batch", max_batch)
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
        finally:
            server.stop()
    # bf16 rounds a batch differently from a single request: how many greedy answers stayed the same
    for r in rows:
        if r["mode"] == "mixed batches":
            alone = next(
                x
                for x in rows
                if x["mode"] != r["mode"]
                and x["concurrent"] == r["concurrent"]
                and x["adapters"] == r["adapters"]
            )
            r["same_text_as_one_at_a_time"] = sum(
                a == b for a, b in zip(r["texts"], alone["texts"], strict=True)
            )
    return rows


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


def table(rows: list[dict[str, Any]], mem: dict[str, Any], n: int) -> str:
    lines = [
        "| concurrent | adapters | mixed batches tok/s | one at a time tok/s | speed-up | median latency (s) mixed / one "
        "| same greedy text |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in (r for r in rows if r["mode"] == "mixed batches"):
        o = next(
            x
            for x in rows
            if x["mode"] != r["mode"] and (x["concurrent"], x["adapters"]) == (r["concurrent"], r["adapters"])
        )
        lines.append(
            f"| {r['concurrent']} | {r['adapters']} | {r['tokens_per_s']:.1f} | {o['tokens_per_s']:.1f} | "
            f"{r['tokens_per_s'] / o['tokens_per_s']:.2f}x | {r['median_latency_s']:.2f} / {o['median_latency_s']:.2f} | "
            f"{r['same_text_as_one_at_a_time']}/{r['concurrent']} |"
        )
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
    p.add_argument("--json", default="benchmarks/results/serve.json")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        adapters = write_adapters(Path(tmp), args.model, max(args.adapters, 16))
        rows = throughput(adapters, args)
        mem = memory(adapters[: args.adapters])
    print(table(rows, mem, args.adapters))
    Path(args.json).write_text(
        json.dumps({"args": vars(args), "throughput": rows, "memory": mem}, indent=2) + "\n"
    )


if __name__ == "__main__":
    main()
