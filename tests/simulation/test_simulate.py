"""Real simulated federations on Flower's engine (Ray) with the tiny model: learning, resume, bad clients."""

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from fedpeft.config.tree import (
    AdapterConfig,
    BaseConfig,
    DataConfig,
    FederationConfig,
    RunConfig,
    TrainConfig,
)
from fedpeft.errors import FedpeftError
from fedpeft.simulation.run import simulate
from tests.conftest import make_text

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.simulation


@pytest.fixture(scope="module")
def users(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fed-users")
    for i in range(6):
        (root / f"user{i}.txt").write_text(make_text(10 + i, 500))
    return root


@pytest.fixture(autouse=True)
def importable_tests(monkeypatch: pytest.MonkeyPatch) -> None:
    # Ray's worker processes import the client app (and tests.faulty_client) by module name.
    monkeypatch.setenv("PYTHONPATH", f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")


def _cfg(users: Path, cache_dir: str, **fed) -> RunConfig:
    federation = {"clients": 4, "fraction": 0.5, "rounds": 3, "local_steps": 3, "seed": 1, **fed}
    return RunConfig(
        base=BaseConfig(model="tiny", quant="nf4", cache_dir=cache_dir),
        adapter=AdapterConfig(kind="lora", r=4),
        data=DataConfig(data=str(users), block_size=32),
        train=TrainConfig(lr=5e-3, batch_size=4, progress=False),
        federation=FederationConfig(**federation),
    )


def _global(run_dir: Path) -> dict[str, np.ndarray]:
    return load_file(run_dir / "global" / "adapter_model.safetensors")


def test_federation_learns_writes_its_files_and_resumes_identically(
    tmp_path: Path, users: Path, cache_dir: str, tiny_path: Path
) -> None:
    cfg = _cfg(users, cache_dir)
    full = simulate(cfg, tmp_path / "full")
    history = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [h["round"] for h in history] == [0, 1, 2, 3]
    assert history[-1]["eval_ppl"] < history[0]["eval_ppl"]
    assert all(len(h["eval_per_client"]) == 4 for h in history)
    assert all(h["bytes_up"] > 0 and len(h["sampled"]) == 2 for h in history[1:])
    assert (tmp_path / "full" / "plot.png").is_file()
    assert sorted(p.name for p in (tmp_path / "full" / "checkpoints").iterdir()) == ["round-002", "round-003"]
    assert full.round == 3
    # round 0 and the last round are also measured on the unquantized base; every round against both
    assert [("full_eval_ppl" in h) for h in history] == [True, False, False, True]
    assert history[0]["full_eval_ppl"] != history[0]["eval_ppl"]  # what NF4 costs
    assert all(h["quant"] == "nf4" and "vs_base" in h and "vs_full_base" in h for h in history[1:])
    # every evaluation also scored the reference text (Hamlet by default); this random tiny base only gains
    assert all(h["forgetting"] < 5 and h["reference_clients"] == 4 for h in history)
    assert history[0]["base_reference_ppl"] == pytest.approx(history[-1]["base_reference_ppl"])
    # --device auto, resolved on this machine, is what config.json and the metrics name
    used = "cuda" if torch.cuda.is_available() else "cpu"
    assert history[0]["device"] == used
    assert json.loads((tmp_path / "full" / "config.json").read_text())["base.device"] == used

    # Crash after round 2 (simulated by deleting round 3), then --resume; and a 2-round run extended to 3.
    crashed = tmp_path / "crashed"
    shutil.copytree(tmp_path / "full", crashed)
    shutil.rmtree(crashed / "checkpoints" / "round-003")
    simulate(cfg, crashed, resume=True)
    for k, v in _global(tmp_path / "full").items():
        np.testing.assert_allclose(_global(crashed)[k], v, rtol=1e-6, atol=1e-7)
    resumed = [json.loads(line) for line in (crashed / "metrics.jsonl").read_text().splitlines()]
    assert [h["round"] for h in resumed] == [0, 1, 2, 3]
    assert resumed[-1]["eval_loss"] == pytest.approx(history[-1]["eval_loss"], rel=1e-6)


def test_ffa_only_b_travels_and_a_stays_at_the_shared_init(
    tmp_path: Path, users: Path, cache_dir: str, tiny_path: Path
) -> None:
    state = simulate(_cfg(users, cache_dir, lora_mode="ffa", rounds=2, keep_checkpoints=0), tmp_path / "ffa")
    assert state.travel_keys and all(".lora_B." in k for k in state.travel_keys)
    init = load_file(tmp_path / "ffa" / "checkpoints" / "round-000" / "global.safetensors")
    final = _global(tmp_path / "ffa")
    for k in final:
        same = np.array_equal(final[k], init[k])
        assert same == (".lora_A." in k), k


def test_the_forgetting_guard_keeps_a_destructive_round_out(
    tmp_path: Path, users: Path, cache_dir: str, tiny_path: Path
) -> None:
    cfg = _cfg(users, cache_dir, clients=3, fraction=1.0, rounds=1, max_forgetting=2.0)
    state = simulate(cfg, tmp_path / "guarded", client_app="tests.faulty_client:destructive")
    last = state.history[-1]
    assert last["forgetting"] > 2 and "above the base's" in last["kept_previous"]
    assert not last.get("skipped") and len(last["accepted"]) == 3  # aggregated, then kept out
    init = load_file(tmp_path / "guarded" / "checkpoints" / "round-000" / "global.safetensors")
    for k, v in _global(tmp_path / "guarded").items():
        np.testing.assert_array_equal(v, init[k])


def test_bad_clients_are_refused_and_the_round_goes_on(
    tmp_path: Path, users: Path, cache_dir: str, tiny_path: Path
) -> None:
    cfg = _cfg(users, cache_dir, clients=6, fraction=1.0, rounds=1)
    state = simulate(cfg, tmp_path / "faulty", client_app="tests.faulty_client:app")
    last = state.history[-1]
    reasons = {r["client"]: r["reason"] for r in last["rejected"]}
    assert sorted(last["accepted"]) == ["user0"]  # not enough valid replies? see min_clients below
    assert "disk full" in reasons["user1"]
    assert "non-finite" in reasons["user2"]
    assert "is (3, 3)" in reasons["user3"]
    assert "fingerprint" in reasons["user4"]
    assert "unexpected" in reasons["user5"]
    assert last["skipped"] is True  # 1 valid reply < min_clients 2: global unchanged
    init = load_file(tmp_path / "faulty" / "checkpoints" / "round-000" / "global.safetensors")
    for k, v in _global(tmp_path / "faulty").items():
        np.testing.assert_array_equal(v, init[k])


def test_too_few_clients_for_the_data(tmp_path: Path, users: Path, cache_dir: str, tiny_path: Path) -> None:
    with pytest.raises(FedpeftError, match="only 6 users"):
        simulate(_cfg(users, cache_dir, clients=8), tmp_path / "few")
    assert not (tmp_path / "few").exists()
    missing = _cfg(users, cache_dir)
    missing = replace(missing, data=replace(missing.data, reference_text=str(tmp_path / "nope.txt")))
    with pytest.raises(FedpeftError, match="--reference-text .*nope.txt: no such file"):
        simulate(missing, tmp_path / "no-reference")  # before Ray starts, not as every client's failure
    assert not (tmp_path / "no-reference").exists()


def test_corrupt_checkpoint_at_resume_stops_cleanly(
    tmp_path: Path, users: Path, cache_dir: str, tiny_path: Path
) -> None:
    from dataclasses import replace

    from fedpeft.federation.state import resume_round
    from tests.federation.test_federation import _flip_tensor_byte

    cfg = _cfg(users, cache_dir, rounds=1)
    run = tmp_path / "run"
    simulate(cfg, run)
    _flip_tensor_byte(run / "checkpoints" / "round-001" / "global.safetensors")  # still parses
    files = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    longer = replace(cfg, federation=replace(cfg.federation, rounds=2))
    with pytest.raises(FedpeftError, match="round-001: global.safetensors does not match its sha256; the last "
                       "round that verifies is 0"):  # fmt: skip
        simulate(longer, run, resume=True)
    # refused before anything was written: config.json, checkpoints, metrics all byte-identical
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == files
    state = simulate(longer, run, resume_from=0)  # the intact round: rounds 1 and 2 are trained again
    assert [h["round"] for h in state.history] == [0, 1, 2]
    assert resume_round(run) == 2  # round 1 rewritten, round 2 written, both verify
    (kept,) = (run / "checkpoints").glob("discarded-after-000-*")  # the damaged round, set aside
    assert [p.name for p in kept.iterdir()] == ["round-001"]


def _secagg(cfg: RunConfig, **fed) -> RunConfig:
    from dataclasses import replace

    return replace(cfg, federation=replace(cfg.federation, **fed))


def test_secagg_equals_plain_aggregation_within_quantization_error(
    tmp_path: Path, users: Path, cache_dir: str, tiny_path: Path
) -> None:
    cfg = _cfg(users, cache_dir, clients=5, fraction=1.0, rounds=2)
    simulate(cfg, tmp_path / "plain")
    state = simulate(_secagg(cfg, secagg=True, secagg_k=2), tmp_path / "secure")
    assert state.history[-1]["secagg"] and state.history[-1]["secagg_k"] == 2
    # each round's keys came with the previous round's evaluation: four stages, not five
    assert [h["secagg_stages"] for h in state.history[1:]] == [4, 4]
    # 4 bytes per parameter plus O(k) key material
    params = sum(v.size for v in _global(tmp_path / "plain").values())
    assert state.history[-1]["bytes_up"] / 5 < 4 * (params + 1) + 2000
    from fedpeft.federation.state import checkpoint_path, load_checkpoint

    # round 1 aggregates the same deltas: equal within the ring code's rounding (~1e-10 here)
    plain, secure = (
        load_checkpoint(checkpoint_path(tmp_path / run, 1)).arrays for run in ("plain", "secure")
    )
    for k, v in plain.items():
        np.testing.assert_allclose(secure[k], v, atol=1e-6)
    assert not all(np.array_equal(secure[k], v) for k, v in plain.items())  # it did go through the ring code
    # round 2 trains from those two globals: in fp32 compute AdamW's early, sign-like steps amplify that
    # rounding on coordinates whose gradient is near zero (bf16 compute used to absorb it), so the last
    # global agrees closely as a whole, not bit for bit
    plain, secure = _global(tmp_path / "plain"), _global(tmp_path / "secure")
    for k, v in plain.items():
        assert np.linalg.norm(secure[k] - v) <= 1e-3 * np.linalg.norm(v) + 1e-6, k


def test_secagg_survives_dropouts_in_training_and_at_unmask(
    tmp_path: Path, users: Path, cache_dir: str, tiny_path: Path
) -> None:
    cfg = _cfg(users, cache_dir, clients=6, fraction=1.0, rounds=1)
    plain = simulate(
        cfg, tmp_path / "plain", client_app="tests.faulty_client:secagg_dropouts"
    )  # client 1 fails to train
    assert plain.history[-1]["accepted"] == ["user0", "user2", "user3", "user4", "user5"]
    secure = simulate(
        _secagg(cfg, secagg=True, secagg_k=5),
        tmp_path / "secure",
        client_app="tests.faulty_client:secagg_dropouts",
    )
    last = secure.history[-1]
    assert last["accepted"] == [
        "user0",
        "user2",
        "user3",
        "user4",
        "user5",
    ]  # 2's input counts though it left
    (rejected,) = last["rejected"]
    assert rejected["client"] == "user1" and rejected["reason"].startswith("dropped at stage 3")
    assert "went away" in rejected["reason"]  # the client's own error travels into the metrics
    assert last["left_before_unmask"] == ["user2"]
    for k, v in _global(tmp_path / "plain").items():
        np.testing.assert_allclose(_global(tmp_path / "secure")[k], v, atol=1e-6)


def test_secagg_with_too_few_survivors_aborts_the_round_cleanly(
    tmp_path: Path, users: Path, cache_dir: str, tiny_path: Path
) -> None:
    cfg = _secagg(_cfg(users, cache_dir, clients=6, fraction=1.0, rounds=1), secagg=True, secagg_k=5)
    state = simulate(cfg, tmp_path / "run", client_app="tests.faulty_client:secagg_mass_dropout")
    assert state.history[-1]["skipped"] and "threshold" in state.history[-1]["abort"]
    # the metrics of an aborted round still say who left and why
    assert {r["client"] for r in state.history[-1]["rejected"]} == {"user2", "user3", "user4", "user5"}
    init = load_file(tmp_path / "run" / "checkpoints" / "round-000" / "global.safetensors")
    for k, v in _global(tmp_path / "run").items():
        np.testing.assert_array_equal(v, init[k])


def _dp(cfg: RunConfig, mode: str = "central", **dp) -> RunConfig:
    from dataclasses import replace

    from fedpeft.config.tree import PrivacyConfig

    return replace(cfg, privacy=PrivacyConfig(mode=mode, **dp))


def test_dp_runs_spend_their_budget_report_it_and_stop_before_exceeding_it(
    tmp_path: Path, users: Path, cache_dir: str, tiny_path: Path, capfd: pytest.CaptureFixture
) -> None:
    from dataclasses import replace

    from fedpeft.privacy.accountant import epsilon

    cfg = _dp(_cfg(users, cache_dir, clients=5, fraction=0.6, rounds=2), epsilon=20.0)
    run = tmp_path / "dp"
    state = simulate(cfg, run)
    dps = [h["dp"] for h in state.history[1:]]
    assert [d["sampling"] for d in dps] == ["poisson", "poisson"] and dps[0]["q"] == 0.6
    assert dps[-1]["epsilon"] == pytest.approx(20.0, rel=1e-3) and dps[-1]["epsilon"] <= 20.0 * (1 + 1e-6)
    assert dps[-1]["epsilon"] == epsilon(dps[0]["noise_multiplier"], 0.6, 2, dps[0]["delta"])
    assert json.loads((run / "global" / "fedpeft.json").read_text())["dp"]["epsilon"] == dps[-1]["epsilon"]
    # two more rounds at the same noise would spend more than the budget: none runs
    longer = replace(cfg, federation=replace(cfg.federation, rounds=4))
    capfd.readouterr()
    again = simulate(longer, run, resume=True)  # the server's log comes from its own process
    assert again.round == 2 and "stopped before round 3" in capfd.readouterr().err


def test_a_secure_dp_round_sums_the_clipped_deltas_as_a_plain_one_does(
    tmp_path: Path, users: Path, cache_dir: str, tiny_path: Path
) -> None:
    """Negligible noise, every client sampled (q = 1): the secure sum of clipped, equally weighted deltas
    over q x N equals the plain DP round's within the ring's quantization, with the server's noise
    (central) or the clients' discrete noise shares inside secure aggregation (distributed)."""
    cfg = _dp(_cfg(users, cache_dir, clients=5, fraction=1.0, rounds=1), noise_multiplier=1e-9, clip=0.05)
    plain = simulate(cfg, tmp_path / "plain")
    secure = simulate(_secagg(cfg, secagg=True, secagg_k=2), tmp_path / "secure")
    assert secure.history[-1]["dp"]["counted"] == 5 and secure.history[-1]["secagg"]
    assert plain.history[-1]["dp"]["clipped_fraction"] == 1.0  # a norm of 0.05 clips every delta here
    distributed = _dp(_secagg(cfg, secagg=True, secagg_k=2), "distributed", noise_multiplier=1e-9, clip=0.05)
    dist = simulate(distributed, tmp_path / "distributed").history[-1]["dp"]
    assert dist["mode"] == "distributed" and dist["counted"] == 5 and dist["counted_min"] == 4
    assert dist["round_noise_multiplier"] == pytest.approx(1e-9 * (5 / 4) ** 0.5)
    assert dist["clipped_fraction"] == pytest.approx(1.0, abs=1e-6)  # summed securely, not reported
    for k, v in _global(tmp_path / "plain").items():
        np.testing.assert_allclose(_global(tmp_path / "secure")[k], v, atol=1e-6)
        np.testing.assert_allclose(_global(tmp_path / "distributed")[k], v, atol=1e-6)


def test_evaluation_every_other_round_on_a_sample_and_always_on_everyone_at_the_end(
    tmp_path: Path, users: Path, cache_dir: str, tiny_path: Path
) -> None:
    from dataclasses import replace

    cfg = _cfg(users, cache_dir, rounds=3, eval_every=2, fraction_evaluate=0.5)
    cfg = replace(cfg, data=replace(cfg.data, eval_max_tokens=40))
    simulate(cfg, tmp_path / "run")
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert ["eval_ppl" in h for h in history] == [True, False, True, True]
    assert [len(h.get("eval_per_client", {})) for h in history] == [2, 0, 2, 2]
    # each sampled client scored the base on its own text too: the change is on the same clients
    for h in history[2:]:
        assert h["base_clients"] == 2 and h["eval_of"] == 4
        base = [c["base_loss"] for c in h["eval_per_client"].values()]
        assert all(
            b == pytest.approx(history[0]["eval_per_client"][u]["loss"])
            for u, b in zip(h["eval_per_client"], base, strict=True)
            if u in history[0]["eval_per_client"]
        )
    # 40 held-out tokens each, in blocks of 32 and 8: 31 + 7 predicted
    assert {c["tokens"] for h in history for c in h.get("eval_per_client", {}).values()} == {38}
    assert "eval_seconds" not in history[1] and (tmp_path / "run" / "plot.png").is_file()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_federation_on_the_gpu_learns_and_reports_its_gpu_memory(
    tmp_path: Path, users: Path, cache_dir: str, tiny_path: Path
) -> None:
    from dataclasses import replace

    cfg = _cfg(users, cache_dir, client_gpus=0.5)  # two actors share the GPU
    cfg = replace(cfg, base=replace(cfg.base, device="cuda"))
    simulate(cfg, tmp_path / "gpu")
    history = [json.loads(line) for line in (tmp_path / "gpu" / "metrics.jsonl").read_text().splitlines()]
    assert history[0]["device"] == "cuda" and history[-1]["eval_ppl"] < history[0]["eval_ppl"]
    figures = [c for h in history[1:] for c in h["client_seconds"].values()]
    assert figures and all(c["gpu_peak_mib"] > 0 for c in figures)


def test_clients_trained_in_lockstep_equal_one_at_a_time_under_secagg_and_dp(
    tmp_path: Path, users: Path, cache_dir: str, tiny_path: Path
) -> None:
    """--clients-per-actor 3: the actor trains three clients at once; with secure aggregation and DP
    (negligible noise, every client sampled) the rounds equal one client at a time within float rounding."""
    cfg = _dp(_cfg(users, cache_dir, clients=6, fraction=1.0, rounds=2), noise_multiplier=1e-9, clip=0.05)
    cfg = _secagg(cfg, secagg=True, secagg_k=2)
    runs = {}
    for k in (1, 3):
        runs[k] = simulate(
            replace(cfg, federation=replace(cfg.federation, clients_per_actor=k)), tmp_path / f"k{k}"
        )
    groups = {
        k: {c["lockstep_clients"] for c in s.history[1]["client_seconds"].values()} for k, s in runs.items()
    }
    assert groups == {1: {1.0}, 3: {3.0}}
    from fedpeft.federation.state import checkpoint_path, load_checkpoint

    one, three = (load_checkpoint(checkpoint_path(tmp_path / f"k{k}", 1)).arrays for k in (1, 3))
    for key, v in one.items():
        np.testing.assert_allclose(three[key], v, atol=1e-6)
    for key, v in _global(tmp_path / "k1").items():
        assert np.linalg.norm(_global(tmp_path / "k3")[key] - v) <= 1e-3 * np.linalg.norm(v) + 1e-6, key
    for a, b in zip(runs[1].history, runs[3].history, strict=True):  # the same held-out loss round by round
        assert a["eval_loss"] == pytest.approx(b["eval_loss"], rel=1e-4)
