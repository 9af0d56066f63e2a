"""Does a deployment compute what the identical simulation computes? Repeated, with every log kept.

    python benchmarks/deploy_equal.py --runs 6 --dp distributed   # ~2.5 min a run on 2 cores

Each run is `fedpeft deploy-local` (a real SuperLink, three SuperNodes with their resident workers, TLS,
node authentication, secure aggregation) on the tiny model, against one `fedpeft simulate` of the same
flags (run --sims times: how far two simulations of the same flags differ is the yardstick; under
--dp distributed each run's noise is fresh secret randomness, so they are not bitwise equal). Per run and round: the largest absolute
difference between the two global adapters (the round's checkpoint), the devices the round accepted, and
what each device computed in. A run whose adapters differ by more than --keep-above keeps its whole folder
(server, SuperLink and devices' logs) under --keep. Prints one line a run and a summary; writes
benchmarks/results/deploy-equal.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedpeft.federation.state import checkpoint_path, load_checkpoint  # noqa: E402
from tests.conftest import make_text  # noqa: E402


def flags(users: Path, cache: str, rounds: int, dp: str) -> list[str]:
    out = [
        "--model", "tiny", "--cache-dir", cache, "--lora-r", "4", "--data", str(users), "--block-size", "32",
        "--lr", "5e-3", "--fraction", "1", "--local-steps", "2", "--seed", "1", "--no-progress",
        "--clients", "3", "--rounds", str(rounds), "--secagg", "--compute-dtype", "fp32",
    ]  # fmt: skip
    if dp == "distributed":  # negligible noise: the sums must match as closely as without DP
        out += ["--dp", "distributed", "--dp-noise-multiplier", "1e-9"]
    return out


def fedpeft(*args: str, log: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with log.open("w") as f:
        done = subprocess.run(
            [sys.executable, "-m", "fedpeft.cli", *args], stdout=f, stderr=subprocess.STDOUT, env=env
        )
    if done.returncode != 0:
        raise SystemExit(f"`fedpeft {args[0]}` failed ({done.returncode}); see {log}")


def globals_of(run: Path, rounds: int) -> list[dict]:
    return [load_checkpoint(checkpoint_path(run, r)).arrays for r in range(1, rounds + 1)]


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(abs(a[k].astype("float64") - b[k].astype("float64")).max()) for k in a)


def history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=6)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument(
        "--sims", type=int, default=2, help="simulations of the same flags (the first is the reference)"
    )
    p.add_argument("--dp", choices=["off", "distributed"], default="distributed")
    p.add_argument("--keep", type=Path, default=Path(tempfile.gettempdir()) / "fedpeft-deploy-equal")
    p.add_argument("--keep-above", type=float, default=1e-6, help="keep a run's logs above this difference")
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fedpeft-equal-"))
    users = work / "users"
    users.mkdir()
    for seed, name, words in ((11, "alice", 500), (12, "bob", 450), (13, "carol", 500)):
        (users / f"{name}.txt").write_text(make_text(seed, words))
    cache = os.environ.get("FEDPEFT_CACHE") or str(work / "cache")
    f = flags(users, cache, a.rounds, a.dp)
    sims = []
    for i in range(1, a.sims + 1):
        fedpeft("simulate", *f, "--out", str(work / f"sim{i}"), log=work / f"sim{i}.log")
        sims.append(globals_of(work / f"sim{i}", a.rounds))
    # later simulations against the first, round by round: what fresh noise alone makes of the same run
    sim_repeat = [[max_diff(x, y) for x, y in zip(other, sims[0], strict=True)] for other in sims[1:]]
    for i, diffs in enumerate(sim_repeat, 2):
        print(
            f"simulation {i} against simulation 1: max |diff| by round {', '.join(f'{d:.3g}' for d in diffs)}"
        )
    runs = []
    try:
        for i in range(a.runs):
            out = work / f"deploy{i}"
            start = time.perf_counter()
            fedpeft("deploy-local", *f, "--out", str(out), log=work / f"deploy{i}.log")
            dep = globals_of(out / "server", a.rounds)
            diffs = [max_diff(d, s) for d, s in zip(dep, sims[0], strict=True)]
            hist = history(out / "server")
            run = {
                "run": i,
                "seconds": round(time.perf_counter() - start, 1),
                "max_diff_by_round": diffs,
                "accepted": [h.get("accepted") for h in hist[1:]],
                "compute": hist[0].get("compute", {}),
                "dp": [h.get("dp", {}).get("counted") for h in hist[1:]],
            }
            if max(diffs) > a.keep_above:
                dest = a.keep / f"{time.strftime('%Y%m%d-%H%M%S')}-run{i}"
                shutil.copytree(out, dest)
                shutil.copytree(work / "sim1", dest / "simulation")
                run["kept"] = str(dest)
            runs.append(run)
            print(json.dumps(run))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if runs:
        worst = max(max(r["max_diff_by_round"]) for r in runs)
        over = sum(max(r["max_diff_by_round"]) > a.keep_above for r in runs)
        print(f"{a.runs} deployments, dp {a.dp}: worst max |diff| {worst:.3g}; {over} above {a.keep_above:g}")
    name = f"deploy-equal-{a.dp}" + ("" if a.runs else "-simulations")
    dest = ROOT / "benchmarks" / "results" / f"{name}.json"
    summary = {"dp": a.dp, "rounds": a.rounds, "simulation_repeat": sim_repeat, "runs": runs}
    dest.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"written to {dest}")


if __name__ == "__main__":
    main()
