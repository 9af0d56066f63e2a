"""Federation benchmark: quality vs centralized, communication and Flower overhead, scale; one run.

    python benchmarks/federation.py quality   # default model: base vs federated (natural/IID, fedavg/ffa) vs centralized
    python benchmarks/federation.py scale     # tiny model, 1,000 and 10,000 virtual clients, next to Flower's bare round
    python benchmarks/federation.py adapters  # the main command's federation once per adapter (--kinds)
    python benchmarks/federation.py ranks     # devices of LoRA ranks 2, 4, 8, 16 in equal shares vs all at rank 4
    python benchmarks/federation.py quants    # NF4 and bf16 devices in equal shares vs all bf16 and all NF4

Quality: every federated run uses the same clients, rounds, sampled clients and local steps; the
centralized baseline trains one adapter on the union of the clients' training text for the same total
number of local steps (rounds x sampled clients x local steps) and is evaluated on the same held-out
text (token-weighted over all clients). Prints markdown tables; writes JSON to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedpeft.config.tree import (  # noqa: E402
    AdapterConfig,
    BaseConfig,
    DataConfig,
    FederationConfig,
    RunConfig,
    TrainConfig,
)
from fedpeft.federation.kinds import by_kind  # noqa: E402
from fedpeft.federation.metrics import as_metrics  # noqa: E402
from fedpeft.federation.ranks import by_rank  # noqa: E402
from fedpeft.processes import descendants, process_table  # noqa: E402


def _tree_rss_mib(root: int) -> float:
    """RSS of a process and all its descendants (the simulation's Ray processes included)."""
    procs = process_table()
    return sum(procs[p].rss for p in [root, *descendants(root, procs)] if p in procs) / 2**20


class TreePeak:
    def __enter__(self) -> TreePeak:
        self.peak, self._stop = 0.0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _tree_rss_mib(os.getpid()))
            time.sleep(0.25)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()


def _federate(cfg: RunConfig, work: Path, name: str, kinds: dict[str, str] | None = None) -> dict:
    """One federation's figures; `kinds` (user -> kind): held-out ppl pooled per kind as well."""
    from fedpeft.simulation.run import simulate

    start = time.perf_counter()
    with TreePeak() as peak:
        state = simulate(cfg, work / name)
    h = state.history
    rounds = [r for r in h[1:] if not r.get("skipped")]
    return {
        "name": name,
        "ppl_start": h[0]["eval_ppl"],
        "ppl": h[-1]["eval_ppl"],
        "loss": h[-1]["eval_loss"],
        "ppl_per_round": [r["eval_ppl"] for r in h],
        "reference_ppl": h[-1].get("reference_ppl"),
        "effective_rank": [r.get("effective_rank") for r in h],
        "by_rank": {str(k): v for k, v in by_rank([as_metrics(r) for r in h]).items()},
        "quants": h[0].get("quants"),
        # the global adapter on the unquantized base (--full-base) where the devices ran another: round 0 and the last
        "full_base": h[0].get("full_base"),
        "full_ppl_start": h[0].get("full_eval_ppl"),
        "full_ppl": h[-1].get("full_eval_ppl"),
        "by_kind": by_kind([as_metrics(r) for r in h], kinds or h[0].get("quants") or {}),
        "base_reference_ppl": h[-1].get("base_reference_ppl"),
        "wall_s": time.perf_counter() - start,
        "peak_rss_mib": peak.peak,
        "round_s": statistics.median(r["seconds"] for r in rounds),
        "history": [
            {k: x.get(k) for k in ("round", "seconds", "eval_seconds", "train_seconds_sum")} for x in h
        ],
        "eval_s": statistics.median(r.get("eval_seconds", 0.0) for r in rounds),
        "bytes_up_per_client": statistics.median(r["bytes_up"] / len(r["sampled"]) for r in rounds),
        # the training phase only: round time minus the evaluation of the new global adapter on every client
        "overhead_vs_slowest": statistics.median(
            (r["seconds"] - r.get("eval_seconds", 0.0)) / r["train_seconds_max"] for r in rounds
        ),
        "overhead_vs_sum": statistics.median(
            (r["seconds"] - r.get("eval_seconds", 0.0)) / r["train_seconds_sum"] for r in rounds
        ),
    }


def _centralized(cfg: RunConfig, steps: int) -> dict:
    from fedpeft.data.blocks import pooled
    from fedpeft.data.partition import partition
    from fedpeft.model.adapters import inject
    from fedpeft.model.base import load_base
    from fedpeft.training.local import evaluate, train

    base = load_base(cfg.base)
    f = cfg.federation
    clients = partition(cfg.data, base.tokenizer, f.clients, f.split, f.dirichlet_alpha, f.seed)
    data = pooled(clients)
    model = inject(base, replace(cfg.adapter, seed=f.seed))
    pad = base.tokenizer.pad_token_id
    before = evaluate(model, data.eval, pad, base.compute)
    tcfg = replace(cfg.train, steps=steps, seed=f.seed, progress=False)
    result = train(model, data, tcfg, tcfg.learning_rate(cfg.adapter.kind), pad, base.compute)
    after = evaluate(model, data.eval, pad, base.compute)
    return {
        "name": f"centralized ({f.split} clients' text)",
        "ppl_start": before.ppl,
        "ppl": after.ppl,
        "loss": after.loss,
        "train_s": result.seconds,
        "base_bytes": base.nbytes,
    }


def quality(a: argparse.Namespace, work: Path) -> dict:
    fed = FederationConfig(
        clients=a.clients, fraction=a.fraction, rounds=a.rounds, local_steps=a.local_steps, seed=0
    )
    base = RunConfig(
        base=BaseConfig(model=a.model, quant="nf4"),
        adapter=AdapterConfig(kind="lora"),
        data=DataConfig(),
        train=TrainConfig(progress=False),
        federation=fed,
    )
    sampled = max(fed.min_clients, math.ceil(fed.fraction * fed.clients))
    total_steps = fed.rounds * sampled * fed.local_steps
    runs = {}
    for name, split, mode in (
        ("fedavg-iid", "iid", "fedavg"),
        ("ffa-iid", "iid", "ffa"),
        ("fedavg-natural", "natural", "fedavg"),
    ):
        cfg = replace(base, federation=replace(fed, split=split, lora_mode=mode))
        runs[name] = _federate(cfg, work, name)
        print(
            f"  {name}: ppl {runs[name]['ppl_start']:.2f} -> {runs[name]['ppl']:.2f}",
            file=sys.stderr,
            flush=True,
        )
    for split in ("iid", "natural"):
        runs[f"centralized-{split}"] = _centralized(
            replace(base, federation=replace(fed, split=split)), total_steps
        )
    # FedAvg makes rounds x local_steps sequential steps of progress (its clients run in parallel): a
    # centralized run with that many steps shows how much of the gap is sequential depth.
    runs["centralized-iid-sequential"] = _centralized(
        replace(base, federation=replace(fed, split="iid")), fed.rounds * fed.local_steps
    )
    base_bytes = runs["centralized-iid"]["base_bytes"]

    print(
        f"\n## Quality on `{a.model}` (nf4, LoRA r=8): {fed.clients} clients, {fed.rounds} rounds, {sampled} sampled "
        f"per round, {fed.local_steps} local steps; centralized: {total_steps} steps\n"
    )
    print("| run | held-out ppl before | after | vs centralized (same text) |\n|---|---|---|---|")
    for name, r in runs.items():
        ref = runs["centralized-natural" if "natural" in name else "centralized-iid"]
        if name == "centralized-iid-sequential":
            name = f"centralized-iid, {fed.rounds * fed.local_steps} steps (= rounds x local steps)"
        print(f"| {name} | {r['ppl_start']:.2f} | {r['ppl']:.2f} | {r['ppl'] / ref['ppl'] - 1:+.1%} |")
    ffa_vs = runs["ffa-iid"]["ppl"] / runs["fedavg-iid"]["ppl"] - 1
    iid_vs = runs["fedavg-iid"]["ppl"] / runs["centralized-iid"]["ppl"] - 1
    print(
        f"\nTargets: federated IID within 3% of centralized: {iid_vs:+.1%} ({'met' if abs(iid_vs) <= 0.03 or iid_vs < 0 else 'not met'}); "
        f"ffa within 3% of fedavg: {ffa_vs:+.1%} ({'met' if abs(ffa_vs) <= 0.03 or ffa_vs < 0 else 'not met'})."
    )
    print("\n## Cost per round (median over rounds)\n")
    print(
        "| run | bytes up per client | / base bytes | round (s) | train phase / slowest client | train phase / sum of clients | "
        "peak RSS, all processes (MiB) |\n|---|---|---|---|---|---|---|"
    )
    for name in ("fedavg-iid", "ffa-iid", "fedavg-natural"):
        r = runs[name]
        print(
            f"| {name} | {r['bytes_up_per_client']:,.0f} | {r['bytes_up_per_client'] / base_bytes:.2%} | {r['round_s']:.1f} | "
            f"{r['overhead_vs_slowest']:.2f} | {r['overhead_vs_sum']:.2f} | {r['peak_rss_mib']:.0f} |"
        )
    return runs


# rows of `adapters` that are LoRA aggregated another way (--lora-mode)
LORA_MODES = {"ffa": "ffa", "sb": "sb"}


def adapters(a: argparse.Namespace, work: Path) -> list[dict]:
    """The main command's federation (its defaults: bf16 base, 10 clients, 5 rounds, seed 0) once per adapter
    type, each at its defaults (rank, learning rate): bytes each client sends a round, held-out and reference
    perplexity. `ffa` and `sb` are LoRA under --lora-mode ffa (FFA-LoRA) and sb (Fed-SB)."""
    kinds = a.kinds.split(",")
    runs = []
    for kind in kinds:
        cfg = RunConfig(
            adapter=AdapterConfig(kind="lora" if kind in LORA_MODES else kind),
            train=TrainConfig(progress=False),
            federation=FederationConfig(lora_mode=LORA_MODES.get(kind, "fedavg")),
        )
        runs.append({"kind": kind, **_federate(cfg, work, kind)})
        print(json.dumps({k: v for k, v in runs[-1].items() if k != "history"}), flush=True)
    print(
        "\n| adapter | bytes up per client a round (share of LoRA's) | held-out ppl: base -> after 5 rounds "
        "| change | reference ppl (base) | round (s) |\n|---|---|---|---|---|---|"
    )
    lora = next((r["bytes_up_per_client"] for r in runs if r["kind"] == "lora"), None)
    for r in runs:
        change = r["ppl"] / r["ppl_start"] - 1
        ref = r["reference_ppl"] / r["base_reference_ppl"] - 1
        share = f" ({r['bytes_up_per_client'] / lora:.1%})" if lora else ""
        print(
            f"| {r['kind']} | {r['bytes_up_per_client']:,.0f}{share} | {r['ppl_start']:.2f} -> {r['ppl']:.2f} "
            f"| {change:+.1%} | {r['reference_ppl']:.2f} ({r['base_reference_ppl']:.2f}, {ref:+.1%}) "
            f"| {r['round_s']:.0f} |"
        )
    return runs


def ranks(a: argparse.Namespace, work: Path) -> list[dict]:
    """The main command's federation with devices of LoRA ranks 2, 4, 8 and 16 in equal shares (--client-ranks,
    federation rank 16) next to every device at rank 4. alpha/r is 4 in both (alpha 64 at rank 16, the
    default 16 at rank 4), so a slice means the same step size in both."""
    rows = [
        ("all rank 4", AdapterConfig(r=4), ()),
        ("ranks 2,4,8,16", AdapterConfig(r=16, alpha=64.0), (2, 4, 8, 16)),
    ]
    runs = []
    for name, adapter, client_ranks in rows:
        cfg = RunConfig(
            adapter=adapter,
            train=TrainConfig(progress=False),
            federation=FederationConfig(client_ranks=client_ranks),
        )
        runs.append({"kind": name, **_federate(cfg, work, name.replace(" ", "-").replace(",", "-"))})
        print(json.dumps({k: v for k, v in runs[-1].items() if k != "history"}), flush=True)
    print(
        "\n| devices | held-out ppl: base -> after 5 rounds | change | by rank | effective rank, rounds 1-5 |"
    )
    print("|---|---|---|---|---|")
    for r in runs:
        groups = (
            "; ".join(f"{k}: {g['ppl_start']:.2f} -> {g['ppl']:.2f}" for k, g in r["by_rank"].items()) or "-"
        )
        eff = ", ".join(f"{x:.1f}" for x in r["effective_rank"] if x is not None)
        print(
            f"| {r['kind']} | {r['ppl_start']:.2f} -> {r['ppl']:.2f} | {r['ppl'] / r['ppl_start'] - 1:+.1%} "
            f"| {groups} | {eff} |"
        )
    return runs


def quants(a: argparse.Namespace, work: Path) -> list[dict]:
    """The main command's federation with NF4 and bf16 devices in equal shares (--client-quants), next to all
    bf16 and all NF4; every row also pooled over the same two halves of the clients, so each kind's figure
    has its counterpart in the uniform federations."""
    rows = [("nf4 + bf16", "bf16", ("nf4", "bf16")), ("all bf16", "bf16", ()), ("all nf4", "nf4", ())]
    runs: list[dict] = []
    for name, quant, client_quants in rows:
        cfg = RunConfig(
            base=BaseConfig(quant=quant),
            train=TrainConfig(progress=False),
            federation=FederationConfig(client_quants=client_quants),
        )
        kinds = runs[0]["quants"] if runs else None  # the mixed row's halves
        runs.append({"kind": name, **_federate(cfg, work, name.replace(" ", "-").replace("+", "and"), kinds)})
        print(json.dumps({k: v for k, v in runs[-1].items() if k != "history"}), flush=True)
    bf16 = runs[1]["ppl"]
    print("\n| devices | held-out ppl, each device on its own base: base -> after 5 rounds | change | the global "
          "adapter on the bf16 base, every client (vs all bf16) | the clients that ran NF4 in the mixed row | the "
          "clients that ran bf16 there | round (s) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for r in runs:
        halves = [r["by_kind"].get(q) for q in ("nf4", "bf16")]
        cells = [f"{g['ppl_start']:.2f} -> {g['ppl']:.2f}" if g else "-" for g in halves]
        on_bf16 = r["full_ppl"] if r["full_ppl"] is not None else r["ppl"]  # all bf16: its own base is bf16
        print(
            f"| {r['kind']} | {r['ppl_start']:.2f} -> {r['ppl']:.2f} | {r['ppl'] / r['ppl_start'] - 1:+.1%} "
            f"| {on_bf16:.2f} ({on_bf16 / bf16 - 1:+.2%}) | {cells[0]} | {cells[1]} | {r['round_s']:.0f} |"
        )
    return runs


def _synthetic_users(root: Path, n: int, words: int = 150) -> Path:
    """n users of random words (a cost measure needs many users, not meaningful text)."""
    import numpy as np

    rng = np.random.default_rng(0)
    vocab = [f"w{i}" for i in range(2000)]
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / f"user{i:05d}.txt").write_text(" ".join(rng.choice(vocab, words)) + "\n")
    return root


def _bare_flower(n: int, fraction: float, dim: int, rounds: int) -> list[float]:
    """Flower's own FedAvg with a ClientApp that trains nothing (benchmarks/flower_bare.py), in a fresh process."""
    import subprocess

    script = Path(__file__).with_name("flower_bare.py")
    args = ["--clients", str(n), "--fraction", str(fraction), "--dim", str(dim), "--rounds", str(rounds)]
    done = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["round_seconds"]


def scale(a: argparse.Namespace, work: Path) -> dict:
    """fedpeft's round next to Flower's bare FedAvg round, 1% of the clients training and evaluated."""
    runs = {}
    rounds, fraction = 4, 0.01
    print(
        f"\n## Scale: tiny model, synthetic users, {fraction:.0%} sampled and evaluated a round, 2 local steps\n"
    )
    print("| virtual clients | fedpeft round (median of rounds 1-3) | Flower's bare FedAvg round (median of rounds 2-4) "
          "| ratio | fedpeft round less its clients' training | ratio | fedpeft's last round (also on the unquantized "
          "base) | peak RSS, all processes (MiB) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for n in a.scale_clients:
        cfg = RunConfig(
            base=BaseConfig(model="tiny", quant="none"),
            data=DataConfig(data=str(_synthetic_users(work / f"users-{n}", n)), block_size=32),
            train=TrainConfig(progress=False, batch_size=2),
            federation=FederationConfig(
                clients=n,
                fraction=fraction,
                fraction_evaluate=fraction,
                min_clients=1,
                rounds=rounds,
                local_steps=2,
            ),
        )
        r = _federate(cfg, work, f"scale-{n}")
        h = r.pop("history")
        fed = statistics.median(x["seconds"] for x in h[1:-1])
        # what Flower's bare round has no counterpart for: the clients' own training steps
        beyond = statistics.median(x["seconds"] - x["train_seconds_sum"] for x in h[1:-1])
        dim = r["bytes_up_per_client"] // 4
        bare = _bare_flower(n, fraction, int(dim), rounds)
        flower = statistics.median(bare[1:])  # its first round also starts the client actor
        r.update(
            fedpeft_round_s=fed,
            fedpeft_round_less_training_s=beyond,
            flower_round_s=flower,
            flower_rounds_s=bare,
            last_round_s=h[-1]["seconds"],
        )
        runs[n] = r
        print(
            f"| {n:,} | {fed:.2f} s | {flower:.2f} s | {fed / flower:.1f}x | {beyond:.2f} s | {beyond / flower:.1f}x "
            f"| {h[-1]['seconds']:.1f} s "
            f"| {r['peak_rss_mib']:.0f} |",
            flush=True,
        )
    return runs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("quality", "scale", "adapters", "ranks", "quants"))
    p.add_argument(
        "--kinds",
        default="lora,ffa,sb,ia3,vera,dora,prompt,prefix",
        help="adapters: which adapter types (ffa, sb: LoRA under --lora-mode ffa, sb)",
    )
    p.add_argument("--model", default="default")
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--fraction", type=float, default=0.5)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--local-steps", type=int, default=5)
    p.add_argument("--json", default=None)
    p.add_argument("--scale-clients", type=lambda v: [int(x) for x in v.split(",")], default=[1000, 10000])
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fedpeft-bench-"))
    try:
        what = {"quality": quality, "scale": scale, "adapters": adapters, "ranks": ranks, "quants": quants}
        runs = what[a.what](a, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = Path(a.json or f"benchmarks/results/federation-{a.what}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(a), "runs": runs}, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
