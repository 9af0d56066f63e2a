"""The round loop as a library component: whole federations of the tiny model through the real ClientApp
handlers over an in-process transport (no Ray, no SuperLink), and the loop's typed parts."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedpeft.config.tree import RunConfig
from fedpeft.federation.loop import Federation
from fedpeft.federation.state import checkpoint_path, load_checkpoint
from fedpeft.federation.tasks import EvalRequest
from fedpeft.federation.transport import describe, match_replies
from tests.conftest import make_text
from tests.federation.inprocess import InProcessTransport
from tests.simulation.test_simulate import _cfg as simulate_cfg


@pytest.fixture(scope="module")
def users(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("loop-users")
    for i in range(4):
        (root / f"user{i}.txt").write_text(make_text(10 + i, 500))
    return root


def _cfg(users: Path, cache_dir: str, **fed) -> RunConfig:
    """tests/simulation/test_simulate.py's federation, two rounds."""
    return simulate_cfg(users, cache_dir, **{"rounds": 2, **fed})


def _run(cfg: RunConfig, run_dir: Path) -> tuple[Federation, InProcessTransport]:
    run_dir.mkdir()
    transport = InProcessTransport.simulation(cfg.federation.clients)
    federation = Federation(transport, cfg, run_dir)
    federation.run()
    return federation, transport


def test_a_federation_learns_and_writes_its_files_over_an_in_process_transport(
    tmp_path: Path, users: Path, cache_dir: str, tiny_path: Path
) -> None:
    run = tmp_path / "run"
    federation, transport = _run(_cfg(users, cache_dir), run)
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [h["round"] for h in history] == [0, 1, 2]
    assert history[-1]["eval_loss"] < history[0]["eval_loss"]  # the held-out loss went down
    assert all(len(h["eval_per_client"]) == 4 for h in history)
    assert all(len(h["sampled"]) == 2 and h["bytes_up"] > 0 and "seconds" in h for h in history[1:])
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["round-001", "round-002"]
    final = load_checkpoint(checkpoint_path(run, 2))
    assert final.round == 2 and [h["round"] for h in final.history] == [0, 1, 2]
    on_disk = load_file(run / "global" / "adapter_model.safetensors")
    assert any(np.any(v != 0) for k, v in on_disk.items() if ".lora_B." in k)  # the averages moved B
    assert (run / "plot.png").is_file()
    # registration (everyone, then the describer), round 0's evaluation, then train and evaluate a round
    assert transport.waits == ["registering clients"] * 2 + ["evaluating"] + ["training", "evaluating"] * 2
    assert sorted(federation.roster.names.values()) == [f"user{i}" for i in range(4)]
    # every evaluation task names its round, client and base, and only the flags this run asks for: the
    # reference text always, the unquantized base in round 0 and the last round (an NF4 base)
    evals = [m.content["task"] for m, _ in transport.sent if m.metadata.message_type == "evaluate"]
    flags = {
        (int(t["round"]), tuple(k for k in t if k not in ("round", "client", "fingerprint"))) for t in evals
    }
    assert flags == {(0, ("full_base", "reference")), (1, ("reference",)), (2, ("full_base", "reference"))}


def test_a_secure_round_aggregates_what_a_plain_round_does_within_quantization_error(
    tmp_path: Path, users: Path, cache_dir: str, tiny_path: Path
) -> None:
    cfg = _cfg(users, cache_dir, clients=3, fraction=1.0, rounds=1)
    _run(cfg, tmp_path / "plain")
    secure_cfg = replace(cfg, federation=replace(cfg.federation, secagg=True, secagg_k=2))
    _, transport = _run(secure_cfg, tmp_path / "secure")
    plain, secure = (load_checkpoint(checkpoint_path(tmp_path / r, 1)) for r in ("plain", "secure"))
    one = secure.history[1]
    assert one["secagg"] and one["secagg_k"] == 2 and one["accepted"] == plain.history[1]["accepted"]
    assert len(one["accepted"]) == 3
    # the round's keys came with round 0's evaluation: four stages, not five
    assert one["secagg_stages"] == 4 and transport.waits.count("training") == 4
    # the same deltas summed masked: equal within the ring code's rounding (the simulation test's tolerance)
    for k, v in plain.arrays.items():
        np.testing.assert_allclose(secure.arrays[k], v, atol=1e-6)
    assert not all(np.array_equal(secure.arrays[k], v) for k, v in plain.arrays.items())  # it went through


def test_an_evaluation_request_sends_only_the_flags_it_sets() -> None:
    assert EvalRequest(0).task() == {"round": 0}
    request = EvalRequest(3, personal=True, specificity=True, reference=True)
    assert list(request.task().items()) == [("round", 3), ("personal", True), ("specificity", True),
                                             ("reference", True)]  # fmt: skip
    assert list(EvalRequest(1, True, True, True, True, True).task()) == [
        "round", "personal", "full_base", "specificity", "with_base", "reference"
    ]  # fmt: skip


def test_replies_are_keyed_as_their_messages_by_the_message_they_answer() -> None:
    from flwr.app import ConfigRecord, Message, RecordDict

    InProcessTransport({})  # sets Flower's task identity, without which no Message is made
    messages = {c: Message(RecordDict({"t": ConfigRecord({"c": c})}), dst_node_id=10 + c, message_type=kind)
                for c, kind in ((0, "train"), (1, "evaluate"), (2, "train"))}  # fmt: skip
    assert describe(messages) == "evaluating, training" and describe({}) == "waiting"
    for c, m in messages.items():
        m.metadata.__dict__["_message_id"] = f"id-{c}"
    # a reply from another node (the SuperLink answering for a dead one) and a stray reply
    replies = [Message(RecordDict(), reply_to=messages[2]), Message(RecordDict(), reply_to=messages[0])]
    stray = Message(RecordDict({"t": ConfigRecord({})}), dst_node_id=1, message_type="train")
    stray.metadata.__dict__["_message_id"] = "other"
    replies.append(Message(RecordDict(), reply_to=stray))
    matched = match_replies(messages, replies)
    assert sorted(matched) == [0, 2] and matched[2].metadata.reply_to_message_id == "id-2"
