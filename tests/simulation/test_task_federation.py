"""Task data through real federations on the tiny model: each record format on deployed devices (our
ClientApp handlers in process, each device reading its own file with the federation's options), and a
labeled table on Flower's simulation engine with personal adapters, then scored again by `fedpeft eval`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from fedpeft.config.tree import (
    BaseConfig,
    DataConfig,
    FederationConfig,
    PersonalConfig,
    RunConfig,
    TrainConfig,
)
from tests.grid import DeviceGrid

ROOT = Path(__file__).resolve().parents[2]
END = "<|im_end|>\n"


def records(fmt: str, user: int) -> tuple[list[dict], list[str]]:
    """Twelve records of one user in `fmt`, and the answers whose tokens alone may carry a loss."""
    rows, answers = [], []
    for i in range(12):
        label = "yes" if (i + user) % 2 else "no"
        if fmt == "prompt-completion":
            rows.append({"q": f"is {i + user} odd?", "a": label})
            answers.append(label)
        elif fmt == "messages":
            answer = f"{i} times {user}"
            rows.append({"messages": [{"role": "system", "content": "be brief"},
                                      {"role": "user", "content": f"say {i} times {user}"},
                                      {"role": "assistant", "content": answer}]})  # fmt: skip
            answers.append(answer)
        else:
            rows.append({"text": f"user {user} line {i}: the quick brown fox jumps over the lazy dog"})
    return rows, answers


@pytest.mark.parametrize(
    "fmt,task", [("prompt-completion", "classify"), ("messages", "generate"), ("text", None)], ids=str
)
def test_each_format_federates_on_devices_and_learns_only_the_answers(
    fmt: str, task: str | None, cache_dir: str, tiny_path: Path, tmp_path: Path
) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    from fedpeft.config.node import DeviceNode
    from fedpeft.data.blocks import collate
    from fedpeft.device.runtime import _DEVICES
    from fedpeft.flower.server_app import run_federation

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    nodes, answers = {}, {}
    for node in (1, 2):
        rows, answers[f"u{node}"] = records(fmt, node)
        path = tmp_path / f"u{node}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        store = tmp_path / f"store-{node}"
        nodes[node] = DeviceNode(data_path=str(path), name=f"u{node}", model=str(tiny_path), cache_dir=cache_dir,
                                 store=str(store), personal_dir=str(store / "personal"))  # fmt: skip
    labeled = fmt == "prompt-completion"
    data = DataConfig(
        block_size=96, reference_text="off", min_train_tokens=8, min_eval_tokens=8, prompt_column="q",
        label_column="a" if labeled else "", labels="no,yes" if labeled else "",
    )  # fmt: skip
    cfg = RunConfig(
        base=BaseConfig(model="tiny", quant="none", cache_dir=cache_dir),
        data=data,
        train=TrainConfig(lr=5e-3, batch_size=4, progress=False),
        federation=FederationConfig(clients=2, fraction=1.0, min_clients=2, rounds=1, local_steps=2),
    )
    run = tmp_path / "run"
    run.mkdir()
    zero, one = run_federation(DeviceGrid(nodes), cfg, run).history
    assert sorted(one["accepted"]) == ["u1", "u2"] and not one.get("skipped")
    if task is None:
        assert "task" not in zero and "task" not in one
    else:
        assert zero["task"]["kind"] == one["task"]["kind"] == task
        # 12 records, the last fifth (2) held out, on each of the two devices
        assert zero["task"]["n"] == one["task"]["n"] == 4
        assert set(one["eval_per_client"]) == {"u1", "u2"} and "vs_base" in one["task"]
    # on each device, the training loss covers the answers and their end of turn, nothing else
    for device in _DEVICES.values():
        d = device.clients[0]
        tokenizer = device.base.tokenizer
        for block in d.train:
            labels = collate([block], 0)["labels"][0]
            scored = tokenizer.decode(labels[labels != -100])
            if task is None:
                assert scored == tokenizer.decode(block)  # raw text: every token
            else:
                assert scored.removesuffix(END) in answers[d.user] and scored.endswith(END)


@pytest.mark.simulation
def test_a_labeled_table_federates_personalizes_and_fedpeft_eval_scores_the_run(
    cache_dir: str, tiny_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedpeft.simulation.run import simulate
    from fedpeft.training.eval_command import evaluate_sources

    monkeypatch.setenv("PYTHONPATH", f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    table = tmp_path / "reviews.csv"
    lines = ["movie,sentence,verdict"] + [
        f"m{i % 3},review {i} was {'great' if i % 2 else 'awful'},{'pos' if i % 2 else 'neg'}"
        for i in range(45)
    ]
    table.write_text("\n".join(lines) + "\n")
    data = DataConfig(data=str(table), user_column="movie", prompt_column="sentence", label_column="verdict",
                      block_size=96, reference_text="off")  # fmt: skip
    cfg = RunConfig(
        base=BaseConfig(model="tiny", quant="none", cache_dir=cache_dir),
        data=data,
        train=TrainConfig(lr=5e-3, batch_size=4, progress=False),
        federation=FederationConfig(clients=3, fraction=1.0, rounds=2, local_steps=2),
        personal=PersonalConfig(method="finetune", steps=2),
    )
    run = tmp_path / "run"
    history = simulate(cfg, run).history
    last = history[-1]
    assert last["task"]["kind"] == "classify" and last["task"]["n"] == 9  # 15 each, 3 held out
    assert set(last["eval_per_client"]) == {"m0", "m1", "m2"}
    assert last["personal"]["task_users"] == 3
    assert all("personal_task" in c for c in last["eval_per_client"].values())
    # fedpeft eval: the same held-out examples, the same metric code, the same figures as the run's
    scored = evaluate_sources(
        ["base", str(run), f"personal={run}"], data, "held-out", [], None, cache_dir, "auto"
    )
    assert scored["base"]["task"]["accuracy"] == pytest.approx(history[0]["task"]["accuracy"])
    assert scored[str(run)]["task"]["accuracy"] == pytest.approx(last["task"]["accuracy"])
    kept = {
        u: c["personal_task"] if c["kept"] == "personal" else c["task"]
        for u, c in last["eval_per_client"].items()
    }
    for user, entry in scored[f"personal={run}"]["users"].items():
        assert entry["accuracy"] == pytest.approx(kept[user]["accuracy"])


def test_a_device_keeps_what_is_wrong_with_its_data_to_itself(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The server chooses the data options; a device whose records do not fit them says so without quoting
    them (a label, a role, its columns' names) back to the server, and logs the reason locally."""
    from fedpeft.device.runtime import _own_data
    from fedpeft.errors import FedpeftError
    from fedpeft.model.tiny import _byte_tokenizer

    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps({"q": "x", "secret": f"private-{i}"}) + "\n" for i in range(12)))
    probe = RunConfig(data=DataConfig(prompt_column="q", label_column="secret", labels="zz1,zz2"))
    with pytest.raises(FedpeftError) as e:
        _own_data(str(path), "me", probe, _byte_tokenizer())
    assert "private" not in str(e.value) and "secret" not in str(e.value)
    assert "private-0" in caplog.text  # the device's own log has the reason
