"""How personal are personal adapters? Finetune's settings swept from one federation's final global adapter.

    python benchmarks/specificity.py RUN                        # RUN: a finished `fedpeft simulate --out RUN`
    python benchmarks/specificity.py RUN --settings 5:2e-4:all,10:2e-4:specific

For each setting (personal steps : learning rate : --personal-change, specific or all) every client of RUN's federation makes its personal adapter
exactly as `--personalize finetune` does at the last round (fedpeft.device.runtime.Device.personalize, from RUN's
global adapter, on RUN's own split), and scores it on its own held-out text and on up to 9 other users' (the first 4 held-out blocks
of each): own gain, gain on others, specificity = own / others (fedpeft.federation.personal_summary.specificity), and whether it
beats the global adapter on its own text. One process, settings one after another; prints a markdown table and
writes benchmarks/results/specificity-<split>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def sweep(run: Path, steps: int, lr: float, change: str, store: Path) -> dict:
    from fedpeft.config.files import from_run_config
    from fedpeft.device.runtime import Device
    from fedpeft.federation.evaluation import EvalResult, eval_metrics
    from fedpeft.federation.personal_summary import summarize
    from fedpeft.model.adapters import read_adapter

    cfg = from_run_config(json.loads((run / "config.json").read_text()))
    personal = replace(cfg.personal, method="finetune", steps=steps, lr=lr, change=change, store=str(store))
    cfg = replace(cfg, personal=personal)
    files = read_adapter(run / "global")
    device = Device(cfg)
    start = time.perf_counter()
    results = []
    for local, data in enumerate(device.clients):
        out = device.personalize(local, files.arrays, cfg.federation.rounds, local, others=True)
        loss, tokens = out.pop("eval_loss"), out.pop("eval_tokens")
        results.append(EvalResult(data.user, loss, tokens, out))
    per_client = eval_metrics(results)["eval_per_client"]
    s = summarize(per_client)
    return {
        "steps": steps,
        "lr": lr,
        "change": change,
        "split": cfg.federation.split,
        "seconds": time.perf_counter() - start,
        "summary": s,
        "per_client": per_client,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path)
    p.add_argument(
        "--settings", default="5:2e-4:all,5:2e-4:specific,10:2e-4:specific", help="steps:lr:change,..."
    )
    a = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedpeft-spec-") as tmp:
        for i, setting in enumerate(a.settings.split(",")):
            steps, lr, change = setting.split(":")
            rows.append(sweep(a.run, int(steps), float(lr), change, Path(tmp) / str(i)))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "per_client"}), flush=True)
    print(
        "\n| steps | lr | change | beats global | median change own | specificity median | own gain | "
        "others' gain | s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        s = r["summary"]
        print(
            f"| {r['steps']} | {r['lr']:g} | {r['change']} | {s['beats_global']}/{s['users']} | {s['median_change']:+.1%} | "
            f"{s['specificity_median']:.2f} | {s['own_gain_median']:+.1%} | {s['others_gain_median']:+.1%} | "
            f"{r['seconds']:.0f} |"
        )
    out = Path(__file__).parent / "results" / f"specificity-{rows[0]['split']}.json"
    out.write_text(json.dumps({"run": str(a.run), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
