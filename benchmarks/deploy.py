"""Deployment benchmark: real SuperLink/SuperNode processes on loopback (TLS + node auth), one run.

    python benchmarks/deploy.py            # everything below, ~15 min on 2 cores
    python benchmarks/deploy.py --quick    # tiny model only (a smoke run of this script)

1. New client, default model: seconds to convert the packaged base into an empty store, then to load
   it quantized, then to load it again (what a device pays before its first round, and at a restart).
2. Client side, default model, 3 clients, 5 secure rounds (`fedpeft deploy-local`): peak PSS of one
   client's whole process tree (fedpeft client + its SuperNode + its resident worker: shared pages once)
   and its summed RSS, sampled every 0.3 s, with each process's peak RSS; the devices' own figures (the
   tree's sampled peak PSS, summed peak RSS); per-round device seconds split into base load, training,
   encoding + masking and waiting, and the devices' base_loads (from the replies' metrics).
3. Server side: peak RSS of the server's process tree (fedpeft server + SuperLink + SuperExec +
   ServerApp) with 3 and 20 clients on the tiny model, and with 3 clients on the default model.
4. Round time of the deployment vs a simulation of the same config (ratio of medians).
Prints a markdown table; writes benchmarks/results/deploy.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedpeft.config.tree import BaseConfig, FederationConfig, RunConfig, TrainConfig  # noqa: E402
from fedpeft.processes import descendants, process_table, pss  # noqa: E402

# a device's processes, by what their command line runs
ROLES = {
    "worker": "fedpeft.device.worker",
    "supernode": "fedpeft.device.supernode",
    "superexec": "flower-superexec",  # Flower's own executor and per-message process: there should be none
    "clientapp": "flwr-clientapp",
}


class Sampler:
    """Every 0.3 s: RSS of the server tree, of each client tree (and its PSS), and of each client's
    processes by role (the supervisor `fedpeft client`, its SuperNode, its worker, and Flower's SuperExec and
    ClientApp processes: there should be none)."""

    def __enter__(self) -> Sampler:
        self.server = 0
        self.client: dict[str, int] = {}
        self.client_pss: dict[str, int] = {}
        self.roles: dict[str, dict[str, int]] = {r: {} for r in (*ROLES, "supervisor")}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            procs = process_table()
            for pid, proc in procs.items():
                is_client = "fedpeft.cli client" in proc.cmdline and " --name " in proc.cmdline
                if not is_client and "fedpeft.cli server" not in proc.cmdline:
                    continue
                tree = [procs[p] for p in [pid, *descendants(pid, procs)] if p in procs]
                if not is_client:
                    self.server = max(self.server, sum(p.rss for p in tree))
                else:
                    name = proc.cmdline.split(" --name ")[1].split()[0]
                    self.client[name] = max(self.client.get(name, 0), sum(p.rss for p in tree))
                    tree_pss = sum(pss(p) for p in [pid, *descendants(pid, procs)])
                    self.client_pss[name] = max(self.client_pss.get(name, 0), tree_pss)
                    for role, needle in (*ROLES.items(), ("supervisor", "fedpeft.cli client")):
                        rss = sum(p.rss for p in tree if needle in p.cmdline)
                        self.roles[role][name] = max(self.roles[role].get(name, 0), rss)
            time.sleep(0.3)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()


def _mib(b: float) -> float:
    return round(b / 2**20, 1)


def _history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def deployment(cfg: RunConfig, out: Path) -> dict:
    from fedpeft.deploy.local import deploy_local

    start = time.perf_counter()
    with Sampler() as s:
        code = deploy_local(cfg, out)
    if code != 0:
        raise SystemExit(f"deployment failed ({code}); see {out}/server.log")
    history = _history(out / "server")
    split = [c for h in history[1:] for c in h.get("client_seconds", {}).values()]
    return {
        "wall_seconds": round(time.perf_counter() - start, 1),
        "round_seconds": [round(h["seconds"], 2) for h in history[1:]],
        "round_seconds_median": statistics.median(h["seconds"] for h in history[1:]),
        "ppl": [round(h["eval_ppl"], 3) for h in history],
        "device_seconds_median": {
            k: round(statistics.median(c.get(k, 0.0) for c in split), 3)
            for k in ("load", "train", "mask", "wait")
        },
        "base_loads_max": max((c.get("base_loads", 0) for c in split), default=0),
        "secagg_stages": [h.get("secagg_stages") for h in history[1:]],
        "reported_peak_rss_mib_max": max((c.get("peak_rss_mib", 0) for c in split), default=0),
        "reported_peak_pss_mib_max": max((c.get("peak_pss_mib", 0) for c in split), default=0),
        "server_peak_rss_mib": _mib(s.server),
        "client_peak_rss_mib": {k: _mib(v) for k, v in sorted(s.client.items())},
        "client_peak_pss_mib": {k: _mib(v) for k, v in sorted(s.client_pss.items())},
        **{
            f"{role}_peak_rss_mib": {k: _mib(v) for k, v in sorted(by_name.items())}
            for role, by_name in s.roles.items()
        },
    }


def simulation(cfg: RunConfig, out: Path) -> dict:
    from fedpeft.simulation.run import simulate

    state = simulate(cfg, out)
    return {
        "round_seconds": [round(h["seconds"], 2) for h in state.history[1:]],
        "round_seconds_median": statistics.median(h["seconds"] for h in state.history[1:]),
        "ppl": [round(h["eval_ppl"], 3) for h in state.history],
    }


def new_client(cache: Path, quant: str) -> dict:
    from fedpeft.model.base import load_base, resolve_base_dir

    t0 = time.perf_counter()
    resolve_base_dir("default", str(cache))
    t1 = time.perf_counter()
    base = load_base(BaseConfig(model="default", quant=quant, cache_dir=str(cache)))
    t2 = time.perf_counter()
    again = load_base(BaseConfig(model="default", quant=quant, cache_dir=str(cache)))
    t3 = time.perf_counter()
    assert again.fingerprint == base.fingerprint
    return {
        "convert_seconds": round(t1 - t0, 1),
        "load_seconds": round(t2 - t1, 2),
        "reload_seconds": round(t3 - t2, 2),
        "base_mib": _mib(base.nbytes),
        "quant": base.quant,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny model only")
    p.add_argument("--skip-20", action="store_true", help="leave out the 20-client server run")
    p.add_argument("--default-only", action="store_true", help="the default model's runs only")
    p.add_argument("--rounds", type=int, default=5, help="rounds of each 3-client federation (default 5)")
    p.add_argument(
        "--no-sim",
        action="store_true",
        help="deployments only (memory figures, no ratios), no new-client timing",
    )
    p.add_argument(
        "--quant", default="auto", help="the base's quantization (default auto: bf16 for the default model)"
    )
    p.add_argument(
        "--max-memory",
        type=float,
        default=None,
        metavar="MIB",
        help="each device's budget, its whole process tree's PSS (fedpeft client --max-memory)",
    )
    a = p.parse_args()
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    work = Path(tempfile.mkdtemp(prefix="fedpeft-bench-"))
    cache = os.environ.get("FEDPEFT_CACHE")
    results: dict = {"cpus": os.cpu_count(), "quant": a.quant, "max_memory": a.max_memory}

    def cfg(model: str, clients: int, rounds: int, secagg: bool, fraction: float = 1.0) -> RunConfig:
        return RunConfig(
            base=BaseConfig(model=model, cache_dir=cache, quant=a.quant),
            train=TrainConfig(progress=False, max_memory=a.max_memory),
            federation=FederationConfig(
                clients=clients, fraction=fraction, rounds=rounds, local_steps=5, secagg=secagg, min_clients=2
            ),
        )

    try:
        tiny3 = cfg("tiny", 3, a.rounds, True)
        if not a.default_only:
            results["tiny_3_deploy"] = deployment(tiny3, work / "tiny3")
            if not a.no_sim:
                results["tiny_3_sim"] = simulation(tiny3, work / "tiny3-sim")
        if not a.skip_20 and not a.default_only:
            results["tiny_20_deploy"] = deployment(cfg("tiny", 20, 1, False, fraction=0.2), work / "tiny20")
        if not a.quick:
            if not a.no_sim:
                results["new_client"] = new_client(work / "empty-store", a.quant)
            default3 = cfg("default", 3, a.rounds, True)
            results["default_3_deploy"] = deployment(default3, work / "default3")
            if not a.no_sim:
                results["default_3_sim"] = simulation(default3, work / "default3-sim")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    name = (
        "deploy-quick"
        if a.quick
        else "deploy"
        if a.quant == "auto" and not a.max_memory
        else f"deploy-{a.quant}"
    )
    dest = Path(__file__).resolve().parent / "results" / f"{name}.json"
    dest.write_text(json.dumps(results, indent=2) + "\n")  # first: a table that fails to print loses nothing
    rows = ["| measure | value |", "|---|---|"]
    for model in ("tiny", "default"):
        d, s = results.get(f"{model}_3_deploy"), results.get(f"{model}_3_sim")
        if d and s:
            ratio = d["round_seconds_median"] / s["round_seconds_median"]
            rows.append(
                f"| {model}, 3 clients, secure round: deployment / simulation | {d['round_seconds_median']:.1f} s / "
                f"{s['round_seconds_median']:.1f} s = {ratio:.1f}x |"
            )
            results[f"{model}_overhead_ratio"] = round(ratio, 2)
    for key in ("tiny_3_deploy", "tiny_20_deploy", "default_3_deploy"):
        if key in results:
            rows.append(
                f"| server peak RSS, {key.replace('_deploy', '').replace('_', ' ')} clients | "
                f"{results[key]['server_peak_rss_mib']:.0f} MiB |"
            )
    for key in ("tiny_3_deploy", "default_3_deploy"):
        if key not in results:
            continue
        d, model = results[key], key.split("_")[0]
        worst = max(d["client_peak_pss_mib"], key=d["client_peak_pss_mib"].get)
        rows.append(
            f"| {model}: a device's process tree, peak PSS / summed peak RSS (sampled; worst device) | "
            f"{d['client_peak_pss_mib'][worst]:.0f} / {d['client_peak_rss_mib'][worst]:.0f} MiB |"
        )
        rows.append(
            f"| {model}: of it, peak RSS of the worker / SuperNode / supervisor / SuperExec + ClientApp | "
            + " / ".join(
                f"{d[f'{r}_peak_rss_mib'].get(worst, 0):.0f}" for r in ("worker", "supernode", "supervisor")
            )
            + f" / {d['superexec_peak_rss_mib'].get(worst, 0) + d['clientapp_peak_rss_mib'].get(worst, 0):.0f}"
            + " MiB |"
        )
        rows.append(
            f"| {model}: what the devices reported, peak PSS / summed peak RSS (max) | "
            f"{d['reported_peak_pss_mib_max']:.0f} / {d['reported_peak_rss_mib_max']:.0f} MiB |"
        )
    for key in ("tiny_3_deploy", "default_3_deploy"):
        if key in results:
            d, model = results[key], key.split("_")[0]
            sec = d["device_seconds_median"]
            rows.append(
                f"| {model}: device seconds per round (median): load / train / mask / wait | {sec['load']:.2f} / "
                f"{sec['train']:.2f} / {sec['mask']:.2f} / {sec['wait']:.2f} |"
            )
            rows.append(
                f"| {model}: base loads per device over {len(d['round_seconds'])} rounds (max) | {d['base_loads_max']:.0f} |"
            )
    if "new_client" in results:
        n = results["new_client"]
        rows.append(
            f"| new client: convert the base / first quantized load / a later load | {n['convert_seconds']:.1f} s / "
            f"{n['load_seconds']:.2f} s / {n['reload_seconds']:.2f} s |"
        )
    print("\n".join(rows))
    dest.write_text(json.dumps(results, indent=2) + "\n")  # with the ratios
    print(f"written to {dest}")


if __name__ == "__main__":
    main()
