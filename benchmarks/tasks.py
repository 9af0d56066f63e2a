"""Task benchmark: the movies federation (simulations/movies.toml) against the base zero-shot, a centralized
adapter trained on the same clients' examples with the same number of steps, FedAdam, and the personal
adapters; and what label scoring costs next to a round's local training. Side by side, per seed.

    python benchmarks/tasks.py --seeds 0 1      # writes benchmarks/results/tasks-seed<S>.json, prints a table
    python benchmarks/tasks.py --quick          # a tiny federation of the same shape, to check the script

Runs, per seed, all on the same 10 clients (movies with the most review sentences) and the same held-out
examples (the last fifth of each movie's sentences):
- zero-shot: round 0 of the FedAvg run (the base alone, adapter disabled);
- FedAvg: simulations/movies.toml (its last round also makes each user's personal adapter, finetune);
- FedAdam: the same with --server-opt fedadam and no personalization;
- centralized: one adapter on every client's training examples pooled, rounds x sampled clients x local
  steps optimizer steps of the same batch (the same total examples seen), in this process.
The reference-text evaluation is off (it measures forgetting, not the task, and costs every round).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedpeft.config.tree import RunConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def config(seed: int, quick: bool) -> RunConfig:
    from fedpeft.config.files import load_toml

    cfg = load_toml(ROOT / "simulations" / "movies.toml")
    cfg = replace(
        cfg,
        data=replace(cfg.data, reference_text="off"),
        train=replace(cfg.train, seed=seed, progress=False),
        federation=replace(cfg.federation, seed=seed),
        adapter=replace(cfg.adapter, seed=seed),
    )
    if quick:  # the same shape on the tiny model: checks the script in a minute
        cfg = replace(cfg, base=replace(cfg.base, model="tiny"),
                      federation=replace(cfg.federation, clients=4, rounds=2, local_steps=2))  # fmt: skip
    return cfg


def federation(cfg: RunConfig, work: Path, name: str) -> dict:
    from fedpeft.simulation.run import simulate

    start = time.perf_counter()
    h = simulate(cfg, work / name).history
    last = h[-1]
    train = [s["train"] for r in h[1:] for s in r.get("client_seconds", {}).values()]
    return {
        "wall_s": time.perf_counter() - start,
        "zero_shot": h[0]["task"],
        "global": last["task"],
        "per_round": [r["task"].get("accuracy") for r in h if r.get("task")],
        "client_train_s_median": statistics.median(train),
        "personal": last.get("personal"),
        "per_client": {
            u: {k: c[k] for k in ("task", "personal_task") if k in c}
            for u, c in last["eval_per_client"].items()
        },  # fmt: skip
    }


def centralized(cfg: RunConfig) -> dict:
    """The pooled adapter, and the cost of label scoring against one client's local training."""
    from fedpeft.data.blocks import pooled
    from fedpeft.data.partition import partition
    from fedpeft.federation.task_eval import client_entry
    from fedpeft.federation.task_eval import pooled as pool
    from fedpeft.model.adapters import adapter_state, inject, load_adapter_state
    from fedpeft.model.base import load_base
    from fedpeft.training.local import train
    from fedpeft.training.task_metrics import score

    f = cfg.federation
    base = load_base(cfg.base)
    clients = partition(cfg.data, base.tokenizer, f.clients, f.split, f.dirichlet_alpha, f.seed)
    model = inject(base, cfg.adapter)
    fresh = adapter_state(model)
    pad, lr = base.tokenizer.pad_token_id, cfg.train.learning_rate(cfg.adapter.kind)

    def scored(c) -> tuple[dict, float]:
        start = time.perf_counter()
        counts = score(
            model, base.tokenizer, c.task, base.compute, cfg.data.answer_tokens, cfg.train.eval_batch_size
        )
        return client_entry(counts), time.perf_counter() - start

    # cost: label scoring of one client's held-out examples vs its local training of one round (fresh adapter)
    local = replace(cfg.train, steps=f.local_steps)
    cost = []
    for c in clients[:3]:
        t = train(model, c, local, lr, pad, base.compute).seconds
        cost.append(scored(c)[1] / t)
    load_adapter_state(model, fresh)  # the centralized run starts from the untrained adapter
    steps = f.rounds * max(1, round(f.clients * f.fraction)) * f.local_steps
    start = time.perf_counter()
    train(model, pooled(clients), replace(cfg.train, steps=steps), lr, pad, base.compute)
    seconds = time.perf_counter() - start
    entries = {c.user: scored(c)[0] for c in clients}
    return {"steps": steps, "train_s": seconds, "global": pool(list(entries.values())), "per_client": entries,
            "scoring_over_local_training": cost}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    for seed in a.seeds:
        cfg = config(seed, a.quick)
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            out = {"seed": seed, "config": "simulations/movies.toml" + (" (quick)" if a.quick else "")}
            out["fedavg"] = federation(cfg, work, "fedavg")
            adam = replace(cfg, server_opt=replace(cfg.server_opt, name="fedadam"),
                           personal=replace(cfg.personal, method="none"))  # fmt: skip
            out["fedadam"] = federation(adam, work, "fedadam")
            out["centralized"] = centralized(cfg)
        name = f"tasks{'-quick' if a.quick else ''}-seed{seed}.json"
        (RESULTS / name).write_text(json.dumps(out, indent=2) + "\n")
        print(table(out))


def table(r: dict) -> str:
    fa, ad, ce = r["fedavg"], r["fedadam"], r["centralized"]
    s = fa.get("personal") or {}
    rows = [
        ("base zero-shot", fa["zero_shot"]),
        (f"centralized ({ce['steps']} steps)", ce["global"]),
        ("FedAvg", fa["global"]),
        ("FedAdam", ad["global"]),
    ]
    lines = [f"seed {r['seed']}", "| run | accuracy | macro-F1 |", "|---|---|---|"]
    lines += [f"| {n} | {t['accuracy']:.1%} | {t['macro_f1']:.3f} |" for n, t in rows]
    if "task_users" in s:
        lines.append(f"| personal (finetune) | {s['task_personal']:.1%} (global on the same users "
                     f"{s['task_global']:.1%}); >= global for {s['task_at_least_global']}/{s['task_users']} users | |")  # fmt: skip
    lines.append(
        f"label scoring / local training of a round: {', '.join(f'{x:.2f}' for x in ce['scoring_over_local_training'])}"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
