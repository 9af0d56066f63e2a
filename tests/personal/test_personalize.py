"""Personal adapters: the store, the methods on a device, the validation choice, and a whole federation run
in one process through the real ClientApp handlers, with every message recorded and inspected."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path
from uuid import uuid4

import numpy as np
import pytest
import torch
from flwr.app import Context, Message, RecordDict

from fedpeft.config.tree import (
    AdapterConfig,
    BaseConfig,
    DataConfig,
    FederationConfig,
    PersonalConfig,
    RunConfig,
    TrainConfig,
)
from fedpeft.data.blocks import UserData
from fedpeft.device.runtime import Device
from fedpeft.errors import FedpeftError
from fedpeft.federation.personal_summary import summarize
from fedpeft.personal.store import PersonalStore, check_store, choose
from fedpeft.personal.strategies import method_label, shared_keys, specific_change, split_validation
from tests.conftest import make_text


@pytest.fixture(autouse=True)
def task_identity() -> None:
    """Flower stamps messages with the running task's identity; its engines set it, so do we."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1


@pytest.fixture
def users(tmp_path: Path) -> Path:
    root = tmp_path / "users"
    root.mkdir()
    for i in range(3):
        (root / f"user{i}.txt").write_text(make_text(20 + i, 500))
    (root / "short.txt").write_text(make_text(99, 8))  # one training block: no validation part
    return root


def _cfg(users: Path, cache_dir: str, store: Path, method: str = "fedsa", **personal) -> RunConfig:
    return RunConfig(
        base=BaseConfig(model="tiny", quant="nf4", compute_dtype="bf16", cache_dir=cache_dir),
        adapter=AdapterConfig(kind="lora", r=4),
        data=DataConfig(data=str(users), block_size=32, min_train_tokens=8, min_eval_tokens=8),
        train=TrainConfig(lr=5e-3, batch_size=4, progress=False),
        federation=FederationConfig(clients=4, fraction=0.5, rounds=2, local_steps=3, seed=1),
        personal=PersonalConfig(**{"method": method, "steps": 3, "store": str(store), **personal}),
    )


def _tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


# --- pure parts ---------------------------------------------------------------------------------------


def test_shared_keys_per_method() -> None:
    names = ["m.lora_A.weight", "m.lora_B.weight"]
    assert shared_keys(names, AdapterConfig(), "fedsa") == ["m.lora_A.weight"]
    assert shared_keys(names, AdapterConfig(freeze_a=True), "none") == ["m.lora_B.weight"]
    assert shared_keys(names, AdapterConfig(), "ditto") == names
    # Fed-SB: the r x r matrix only; VeRA: its vectors, never the shared random matrices
    sb = [*names, "m.lora_R.weight"]
    assert shared_keys(sb, AdapterConfig(lora_sb=True), "none") == ["m.lora_R.weight"]
    vera = ["base_model.vera_A", "base_model.vera_B", "m.vera_lambda_b", "m.vera_lambda_d"]
    assert shared_keys(vera, AdapterConfig(kind="vera"), "none") == vera[2:]


def test_validation_is_the_tail_of_the_training_blocks_or_nothing() -> None:
    blocks = [torch.full((32,), i) for i in range(20)]
    train, val = split_validation(UserData("u", blocks, blocks[:2]), 0.1, 16)
    assert [int(b[0]) for b in val] == [18, 19] and len(train.train) == 18
    small = UserData("u", [torch.zeros(10, dtype=torch.long)] * 2, [])
    same, none = split_validation(small, 0.5, 16)
    assert none == [] and same is small  # 10 tokens < 16: no validation part, training text unchanged
    assert choose(1.0, 0.99) == "personal" and choose(1.0, 1.0) == "global"


def test_specific_change_drops_the_federations_direction_tensor_by_tensor() -> None:
    """personal = global + a v + w, v the federation's move from init and w orthogonal to it: only w stays.
    A tensor the federation left at its init keeps its whole change."""
    rng = np.random.default_rng(0)
    init = {"a": rng.normal(size=(4, 6)).astype(np.float32), "b": np.zeros((6, 4), np.float32)}
    v = {"a": rng.normal(size=(4, 6)), "b": rng.normal(size=(6, 4))}
    glob = {k: (init[k] + v[k]).astype(np.float32) for k in init}
    w = {}
    for k in init:  # a random change with its component along v removed
        r = rng.normal(size=v[k].shape)
        w[k] = r - (np.vdot(r, v[k]) / np.vdot(v[k], v[k])) * v[k]
    personal = {k: (glob[k] + 0.7 * v[k] + w[k]).astype(np.float32) for k in init}
    out = specific_change(personal, glob, init)
    for k in init:
        assert out[k].dtype == np.float32
        np.testing.assert_allclose(out[k], glob[k] + w[k], atol=1e-5)
        assert abs(np.vdot(out[k].astype(np.float64) - glob[k], v[k])) < 1e-4
    unmoved = specific_change(personal, {**glob, "b": init["b"]}, init)
    np.testing.assert_array_equal(unmoved["b"], personal["b"])
    along = {k: (glob[k] + 2.0 * v[k]).astype(np.float32) for k in init}  # nothing specific: the global
    for k, a in specific_change(along, glob, init).items():
        np.testing.assert_allclose(a, glob[k], atol=1e-5)


def test_the_summary_names_which_part_of_its_change_finetune_keeps() -> None:
    assert method_label(PersonalConfig(method="finetune")) == "finetune, specific change"
    assert method_label(PersonalConfig(method="finetune", change="all")) == "finetune, whole change"
    assert method_label(PersonalConfig(method="ditto", change="all")) == "ditto"


def test_summary_counts_users_and_changes() -> None:
    per_client = {
        "a": {"ppl": 10.0, "personal_ppl": 8.0, "kept": "personal", "kept_ppl": 8.0, "note": ""},
        "b": {"ppl": 10.0, "personal_ppl": 11.0, "kept": "global", "kept_ppl": 10.0, "note": ""},
        "c": {"ppl": 10.0, "kept": "global", "kept_ppl": 10.0, "note": "no personal adapter yet"},
    }
    s = summarize(per_client)
    assert (s["users"], s["beats_global"], s["kept_personal"]) == (2, 1, 1)
    assert s["median_change"] == pytest.approx(-0.05) and s["worst_change"] == pytest.approx(0.1)
    assert s["worst_user"] == "b" and s["without_personal"] == ["c"] and s["kept_change_worst"] == 0.0
    assert "personal_reference_ppl_median" not in s  # no reference text: nothing claimed
    per_client["a"]["personal_reference_ppl"] = 40.0
    per_client["b"].update(personal_reference_ppl=50.0, forgets=True)
    s = summarize(per_client)
    assert s["personal_reference_ppl_median"] == 45.0 and s["forgetting_kept_global"] == 1
    from fedpeft.federation.personal_summary import summary_line

    assert "reference text ppl median 45.00 (1 kept global: their personal adapter forgets)" in summary_line(
        s, "finetune"
    )


# --- on a device (tiny model, no Flower) ---------------------------------------------------------------


def test_fedsa_shares_a_keeps_b_and_writes_a_store_peft_loads(
    tmp_path: Path, users: Path, cache_dir: str, tiny_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    store = tmp_path / "store"
    device = Device(_cfg(users, cache_dir, store))
    i = [d.user for d in device.clients].index("user0")
    user = device.clients[i].user
    assert device.keys and all(".lora_A." in k for k in device.keys)
    global_a = {k: device.init_state[k] for k in device.keys}
    fit = device.fit(i, global_a, rnd=1)
    assert sorted(fit.delta) == sorted(device.keys)  # only A leaves the device
    personal = PersonalStore(store, user).load()
    assert personal is not None
    b_keys = [k for k in personal if ".lora_B." in k]
    assert b_keys and all(np.abs(personal[k]).max() > 0 for k in b_keys)  # B trained and kept
    meta = json.loads((store / user / "personal" / "fedpeft.json").read_text())
    assert meta["base_fingerprint"] == device.fingerprint and meta["personal"]["global_round"] == 0

    new_a = {k: global_a[k] + fit.delta[k] for k in device.keys}
    out = device.personalize(i, new_a, rnd=1)
    assert out["personal_eval_loss"] < out["eval_loss"]  # own B on the user's own text
    assert out["kept"] == choose(out["val_loss_global"], out["val_loss_personal"]) and out["note"] == ""
    saved = PersonalStore(store, user).load()
    np.testing.assert_array_equal(saved[device.keys[0]], new_a[device.keys[0]])  # latest shared A
    np.testing.assert_array_equal(saved[b_keys[0]], personal[b_keys[0]])  # own B
    choice = json.loads((store / user / "choice.json").read_text())
    assert choice["use"] == out["kept"] and choice["global_round"] == 1

    # PEFT loads the personal folder as it is onto the plain base, and computes what our device computed
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_path), store / user / "personal"
    )
    ours = {k: v for k, v in saved.items()}
    theirs = {
        k.replace(".default", ""): v.detach().numpy() for k, v in model.state_dict().items() if "lora_" in k
    }
    for k, v in ours.items():
        np.testing.assert_array_equal(theirs[k], v)


def test_ditto_pull_keeps_the_personal_adapter_near_the_global(
    tmp_path: Path, users: Path, cache_dir: str, tiny_path: Path
) -> None:
    def distance(lam: float) -> float:
        store = tmp_path / f"store-{lam}"
        device = Device(_cfg(users, cache_dir, store, "ditto", lam=lam, steps=8))
        start = dict(device.init_state)
        i = [d.user for d in device.clients].index("user0")
        fit = device.fit(i, start, rnd=1)
        assert sorted(fit.delta) == sorted(device.init_state) and fit.personal_seconds > 0
        v = PersonalStore(store, "user0").load()
        return float(sum(np.sum((v[k] - start[k]) ** 2) for k in v))

    free, pulled = distance(0.0), distance(1e4)
    assert pulled < 0.2 * free  # the proximal term holds v near w


def test_finetune_and_the_fallback_for_too_little_text(
    tmp_path: Path, users: Path, cache_dir: str, tiny_path: Path
) -> None:
    device = Device(_cfg(users, cache_dir, tmp_path / "store", "finetune"), clients=None)
    names = [d.user for d in device.clients]
    short = names.index("short")
    assert device.clients[short].val == [] and all(
        device.clients[i].val for i in range(len(names)) if i != short
    )
    out = device.personalize(short, dict(device.init_state), rnd=2)
    assert out["kept"] == "global" and out["note"].startswith("too little text")
    assert "personal_eval_loss" in out and "val_loss_personal" not in out
    ok = device.personalize(names.index("user0"), dict(device.init_state), rnd=2)
    assert ok["personal_eval_loss"] < ok["eval_loss"] and ok["kept"] == "personal"


def test_finetune_keeps_the_specific_part_of_the_same_personal_steps(
    tmp_path: Path, users: Path, cache_dir: str, tiny_path: Path
) -> None:
    """--personal-change specific stores exactly the whole change (all) with the direction the federation
    moved the global adapter in projected out, tensor by tensor: the same seeded steps, two stores."""
    stored = {}
    for change in ("all", "specific"):
        device = Device(_cfg(users, cache_dir, tmp_path / change, "finetune", change=change))
        fit = device.fit(0, dict(device.init_state), rnd=1)
        glob = {**device.init_state, **{k: device.init_state[k] + d for k, d in fit.delta.items()}}
        device.personalize(1, glob, rnd=2)
        stored[change] = device.stores[1].load()
    expect = specific_change(stored["all"], glob, device.init_state)
    moved = 0
    for k, a in stored["specific"].items():
        np.testing.assert_allclose(a, expect[k], atol=1e-6)
        v = glob[k].astype(np.float64) - device.init_state[k]
        if np.vdot(v, v) > 0:
            moved += 1
            d = a.astype(np.float64) - glob[k]
            assert abs(np.vdot(d, v)) <= 1e-4 * np.linalg.norm(d) * np.linalg.norm(v) + 1e-12
    assert moved > 0 and not all(np.array_equal(stored["all"][k], stored["specific"][k]) for k in expect)


def test_round_zero_global_is_the_base(users: Path, cache_dir: str, tiny_path: Path, tmp_path: Path) -> None:
    """The server takes each user's base perplexity from round 0: the initial adapter must be the identity."""
    from fedpeft.training.local import evaluate

    device = Device(_cfg(users, cache_dir, tmp_path / "store", "none"))
    loss, _ = device.evaluate(0, dict(device.init_state))
    with device.model.disable_adapter():
        base = evaluate(device.model, device.clients[0].eval, 0, device.base.compute)
    assert loss == pytest.approx(base.loss, abs=1e-6)


def test_round_zero_is_one_base_whatever_the_adapter_and_the_full_base_is_another(
    users: Path, cache_dir: str, tiny_path: Path, tmp_path: Path
) -> None:
    """Round 0 evaluates the base with the adapter disabled: LoRA's and IA3's identity inits went through
    fp32 in peft and gave two "bases". The unquantized base is a third, measured figure."""
    from fedpeft.model.base import load_base
    from fedpeft.training.local import evaluate

    cfg = _cfg(users, cache_dir, tmp_path / "store", "none")
    losses = []
    for kind in ("lora", "ia3"):
        device = Device(replace(cfg, adapter=AdapterConfig(kind=kind)))
        losses.append(device.evaluate(0, dict(device.init_state), bare=True)[0])
    assert losses[0] == losses[1]
    full = device.evaluate_full(0, dict(device.init_state), bare=True)  # --full-base bf16, the default
    bf16 = load_base(replace(cfg.base, quant="bf16", compute_dtype=device.base.compute))
    assert full == evaluate(bf16.model, device.clients[0].eval, 0, bf16.compute).loss and full != losses[1]
    device.drop_full_base()
    assert device._full is None


def test_a_device_budget_too_small_for_the_full_base_skips_that_evaluation(
    users: Path, cache_dir: str, tiny_path: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """--full-base loads an unquantized copy beside the device's NF4 base: a device whose --max-memory
    cannot hold both skips that evaluation (None: the server reports the devices that ran it)."""
    from fedpeft.model.memory import full_base_mib

    cfg = _cfg(users, cache_dir, tmp_path / "store", "none")
    device = Device(cfg)
    tokens = len(device.clients[0].eval[0]) * cfg.train.eval_batch_size
    params = sum(a.size for a in device.init_state.values())
    need = full_base_mib(device.base, "bf16", params, tokens, cfg.train)
    assert need > full_base_mib(device.base, "bf16", params, 1, cfg.train)  # grows with the batch
    assert full_base_mib(device.base, "none", params, tokens, cfg.train) > need  # fp32 holds more
    tight = Device(replace(cfg, train=replace(cfg.train, max_memory=need - 1)))
    with caplog.at_level("WARNING", logger="fedpeft"):
        assert tight.evaluate_full(0, dict(tight.init_state), bare=True) is None
    assert "skips the full-base evaluation" in caplog.text and tight._full is None
    roomy = Device(replace(cfg, train=replace(cfg.train, max_memory=need + 1)))
    assert isinstance(roomy.evaluate_full(0, dict(roomy.init_state), bare=True), float)


def test_cross_eval_scores_both_adapters_on_other_users_text(
    users: Path, cache_dir: str, tiny_path: Path, tmp_path: Path
) -> None:
    device = Device(_cfg(users, cache_dir, tmp_path / "store", "finetune", cross_users=2))
    state = dict(device.init_state)
    same = device.cross_eval(0, 0, state, state)
    assert same["others"] == 2 and same["others_loss_global"] == same["others_loss_personal"]
    moved = {k: v + 0.05 for k, v in state.items()}
    other = device.cross_eval(0, 0, state, moved)
    assert other["others_loss_global"] == same["others_loss_global"]
    assert other["others_loss_personal"] != other["others_loss_global"]
    alone = Device(_cfg(users, cache_dir, tmp_path / "store", "finetune", cross_users=0))
    assert alone.cross_eval(0, 0, state, moved) == {}


@pytest.mark.parametrize("what", ["fingerprint", "schema"])
def test_a_foreign_store_is_refused_and_left_untouched(
    tmp_path: Path, users: Path, cache_dir: str, tiny_path: Path, what: str
) -> None:
    store = tmp_path / "store"
    device = Device(_cfg(users, cache_dir, store))
    device.fit(0, {k: device.init_state[k] for k in device.keys}, rnd=1)
    meta_path = store / device.clients[0].user / "personal" / "fedpeft.json"
    meta = json.loads(meta_path.read_text())
    if what == "fingerprint":
        meta["base_fingerprint"] = "0" * 64
        cfg = _cfg(users, cache_dir, store)
    else:
        cfg = replace(_cfg(users, cache_dir, store), adapter=AdapterConfig(kind="lora", r=2))
    if what == "fingerprint":
        meta_path.write_text(json.dumps(meta))
    before = _tree_hash(store)
    with pytest.raises(
        FedpeftError, match="another base" if what == "fingerprint" else "another adapter schema"
    ):
        Device(cfg)
    assert _tree_hash(store) == before


# --- a whole federation through the real ClientApp handlers, every message recorded --------------------


class RecordingGrid:
    """An in-process Grid: each node is our ClientApp's handler with its own Context; keeps every message."""

    def __init__(self, n: int) -> None:
        self.contexts = {
            node: Context(
                run_id=1,
                node_id=node,
                node_config={"partition-id": node - 1, "num-partitions": n},
                state=RecordDict(),
                run_config={},
            )
            for node in range(1, n + 1)
        }
        self.messages: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages: list[Message]) -> list[str]:
        """Runs each message's handler at once; pull_messages hands out the replies."""
        from fedpeft.flower.client_app import describe, evaluate, train

        self.replies: list[Message] = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = str(uuid4())
            handler = {"query": describe, "train": train, "evaluate": evaluate}[m.metadata.message_type]
            reply = handler(m, self.contexts[m.metadata.dst_node_id])
            self.messages += [m, reply]
            self.replies.append(reply)
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, message_ids: set[str]) -> list[Message]:
        out = [r for r in self.replies if r.metadata.reply_to_message_id in message_ids]
        self.replies = [r for r in self.replies if r not in out]
        return out


def _arrays_in(message: Message) -> list[tuple[str, np.ndarray]]:
    out = []
    for record in message.content.array_records.values():
        out += [(k, a.numpy()) for k, a in record.items()]
    return out


@pytest.mark.parametrize("method", ["fedsa", "ditto"])
def test_no_message_carries_a_personal_adapter(
    tmp_path: Path, users: Path, cache_dir: str, tiny_path: Path, method: str
) -> None:
    from fedpeft.flower.server_app import run_federation

    run = tmp_path / "run"
    run.mkdir()
    cfg = _cfg(users, cache_dir, run / "personal", method)
    grid = RecordingGrid(4)
    run_federation(grid, cfg, run)

    personal = {}
    for user_dir in sorted((run / "personal").iterdir()):
        arrays = PersonalStore(run / "personal", user_dir.name).load()
        if arrays is not None:
            personal[user_dir.name] = arrays
    assert len(personal) >= 2  # some users were sampled and hold personal adapters
    sent = [(k, a) for m in grid.messages for k, a in _arrays_in(m)]
    assert sent
    for user, arrays in personal.items():
        for key, value in arrays.items():
            if method == "fedsa" and ".lora_A." in key:
                continue  # the shared half: the store holds the latest global A, which the server sent
            if not np.any(value):
                continue  # an all-zero init tensor is not personal information
            for _, a in sent:
                assert a.shape != value.shape or not np.allclose(a, value), f"{user}'s {key} left the device"
    if method == "fedsa":
        # B travels only as the zero init in the registration's description, never trained
        assert all(not np.any(a) for k, a in sent if ".lora_B." in k)

    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = history[-1]["eval_per_client"]
    assert {"base_ppl", "ppl", "kept", "kept_ppl"} <= set(next(iter(last.values())))
    assert history[-1]["personal"]["users"] >= 2
    assert last["short"]["note"] and last["short"]["kept"] == "global"
    assert (run / "plot.png").stat().st_size > 0


# --- the commands as a user meets them (Ray simulation, subprocesses) ------------------------------------


@pytest.mark.simulation
@pytest.mark.slow  # three federations in a row: CI's second pass (pyproject, markers)
def test_simulate_export_generate_and_a_foreign_store_on_resume(
    tmp_path: Path, users: Path, cache_dir: str, tiny_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tests.test_cli import assert_user_error, fedpeft

    root = Path(__file__).resolve().parents[2]
    monkeypatch.setenv("PYTHONPATH", f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    run = tmp_path / "run"

    def simulate(rounds: int, *extra: str):
        return fedpeft(
            "simulate",
            *(
                "--model",
                "tiny",
                "--data",
                str(users),
                "--clients",
                "3",
                "--block-size",
                "32",
                "--lr",
                "5e-3",
            ),
            *("--rounds", str(rounds), "--local-steps", "3", "--personalize", "ditto", "--out", str(run)),
            "--no-progress",
            *extra,
            cache_dir=cache_dir,
        )

    proc = simulate(2)
    assert proc.returncode == 0, proc.stderr
    assert "personal (ditto) beats global for" in proc.stdout
    users_with_personal = sorted(p.parent.name for p in (run / "personal").glob("*/personal"))
    assert users_with_personal

    user = users_with_personal[0]
    proc = fedpeft(
        "export",
        str(run),
        "--user",
        user,
        "--which",
        "personal",
        "--out",
        str(tmp_path / "exp"),
        cache_dir=cache_dir,
    )
    assert proc.returncode == 0 and f"{user}'s personal adapter" in proc.stdout, proc.stderr
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_path), tmp_path / "exp")
    proc = fedpeft("export", str(run), "--user", "nobody", "--out", str(tmp_path / "x"), cache_dir=cache_dir)
    assert_user_error(proc, "no personal adapter for user 'nobody'")

    proc = fedpeft(
        "generate",
        str(run),
        "--user",
        user,
        "--prompt",
        "the quick",
        "--max-new-tokens",
        "5",
        cache_dir=cache_dir,
    )
    assert proc.returncode == 0, proc.stderr
    assert (
        "--- base ---" in proc.stdout
        and "--- global (round 2" in proc.stdout
        and "--- personal (round" in proc.stdout
    )

    # a store made on another base: resuming refuses it in one line and leaves it as it was
    meta_path = run / "personal" / user / "personal" / "fedpeft.json"
    meta = json.loads(meta_path.read_text())
    meta["base_fingerprint"] = "0" * 64
    meta_path.write_text(json.dumps(meta))
    before = _tree_hash(run / "personal")
    proc = simulate(3, "--resume")
    assert_user_error(proc, "was made for another base")
    assert _tree_hash(run / "personal") == before


def test_find_store_by_name_or_id_and_a_corrupt_choice(tmp_path: Path) -> None:
    from fedpeft.personal.store import find_store

    (tmp_path / "run" / "personal" / "barack-obama").mkdir(parents=True)
    assert find_store(tmp_path / "run", "Barack Obama").dir.name == "barack-obama"
    (tmp_path / "run" / "personal" / "barack-obama" / "choice.json").write_text("{not json")
    with pytest.raises(FedpeftError, match="unreadable"):
        find_store(tmp_path / "run", "barack-obama").choice()
    with pytest.raises(FedpeftError, match="users there: barack-obama"):
        find_store(tmp_path / "run", "nobody")


def test_a_malformed_personal_report_is_ignored_not_fatal() -> None:
    """One device sends a personal report without its fields: the round's evaluation goes on, that user
    simply has no personal figures, the other user's are read."""
    from flwr.app import ConfigRecord, MetricRecord

    from fedpeft.config.tree import AdapterConfig
    from fedpeft.federation.loop import Federation
    from fedpeft.federation.roster import Roster
    from fedpeft.federation.state import ServerState
    from fedpeft.federation.tasks import EvalRequest
    from fedpeft.flower.grid import GridTransport
    from fedpeft.model.adapter_files import AdapterDescription

    class Grid:
        def pull_messages(self, ids: set[str]) -> list[Message]:
            return [r for r in self.replies if r.metadata.reply_to_message_id in ids]

        def push_messages(self, messages: list[Message]) -> list[str]:
            self.replies = replies = []
            for m in messages:
                m.metadata.__dict__["_message_id"] = str(uuid4())
                client = int(m.content["task"]["client"])
                personal = {"kept": "global", "personal_seconds": 0.5} if client == 0 else {"note": "x"}
                content = RecordDict(
                    {
                        "info": ConfigRecord({"client": client}),
                        "metrics": MetricRecord({"eval_loss": 3.0, "eval_tokens": 10}),
                        "personal": ConfigRecord(personal),
                    }
                )
                replies.append(Message(content, reply_to=m))
            return [m.metadata.message_id for m in messages]

    roster = Roster(
        node_of={0: 1, 1: 2}, names={0: "ann", 1: "bob"}, fingerprints={0: "f", 1: "f"}, fingerprint="f"
    )
    arrays = {"x": np.zeros(2, np.float32)}
    info = AdapterDescription("f", [("x", (2,), "float32")], ["x"], {}, AdapterConfig(), "", "")
    state = ServerState(1, arrays, {}, info)
    federation = Federation(GridTransport(Grid()), RunConfig(), Path())
    federation.roster = roster
    result = federation.evaluate(state, EvalRequest(1, personal=True))
    assert result["eval_per_client"]["ann"]["kept"] == "global"
    assert "kept" not in result["eval_per_client"]["bob"] and result["eval_tokens"] == 20


def test_a_store_that_cannot_be_written_is_a_one_line_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(FedpeftError, match="--store is a file"):
        check_store(RunConfig(personal=PersonalConfig(method="ditto", store=str(blocker))))
    store = PersonalStore(blocker, "ann")  # a device whose store root turned into a file mid-run
    with pytest.raises(FedpeftError, match="cannot write the personal store"):
        store.save_choice({"use": "global"})


def test_a_device_keeps_its_global_adapter_over_a_personal_one_that_forgets(
    tmp_path: Path, users: Path, cache_dir: str, tiny_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _cfg(users, cache_dir, tmp_path / "store", "finetune")
    cfg = replace(cfg, federation=replace(cfg.federation, max_forgetting=2.0))
    device = Device(cfg, clients=None)
    user0 = [d.user for d in device.clients].index("user0")
    init = {k: v for k, v in device.init_state.items() if k in device.keys}
    # the decision, on a crafted adapter: a trained LoRA B reversed and scaled unlearns what training taught
    # the tiny random base (+7% on the reference text, about the most this near-uniform base allows)
    delta = device.fit(user0, init, 1).delta
    bad = {k: init[k] + (-5 if ".lora_B." in k else 1) * delta[k] for k in init}
    out: dict = {}
    why = device._personal_forgetting({**device.init_state, **bad}, out)
    assert "the personal adapter forgets" in why and "reference_loss_personal" in out
    assert device._personal_forgetting({**device.init_state, **init}, {}) == ""  # the base itself: no
    # the wiring: a personal adapter that wins on validation is still not kept when it forgets
    assert device.personalize(user0, dict(device.init_state), rnd=2)["kept"] == "personal"
    monkeypatch.setattr(
        device, "_personal_forgetting", lambda personal, out: "the personal adapter forgets: x"
    )
    out = device.personalize(user0, dict(device.init_state), rnd=2)
    assert (
        out["kept"] == "global"
        and out["note"].startswith("the personal adapter forgets")
        and out["forgets"] == 1.0
    )
    assert out["val_loss_personal"] < out["val_loss_global"]
