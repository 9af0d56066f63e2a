"""The server's secure round: real client stages in one process, the state and metrics it returns."""

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, RecordDict

from fedpeft.config.tree import FederationConfig, RunConfig
from fedpeft.federation.secure_round import ring_code, round_tag, secure_round
from fedpeft.secagg.client_stages import handle
from fedpeft.secagg.records import flatten
from tests.federation.test_federation import FP, _state

B = "x.lora_B.weight"
NAMES = {c: f"user{c}" for c in range(6)}


@pytest.fixture(autouse=True)
def task_identity() -> None:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1


def _cfg(**federation) -> RunConfig:
    return RunConfig(federation=FederationConfig(clients=6, secagg=True, secagg_k=5, **federation))


def test_ring_code_and_tag() -> None:
    code = ring_code(_cfg(local_steps=5), [10.0, 30.0, 20.0])
    assert code.clip == pytest.approx(2 * 2e-4 * 5) and code.max_clients == 3 and code.max_weight == 30.0
    assert round_tag(FP, 7, 3) == b"ffffffffffffffff|seed-7|round-3"


def test_a_secure_round_steps_on_the_survivors_weighted_mean() -> None:
    rng = np.random.default_rng(0)
    deltas = {c: rng.uniform(-1e-3, 1e-3, (4, 2)).astype(np.float32) for c in range(6)}
    weights = {c: float(100 + 50 * c) for c in range(6)}
    states = {c: RecordDict() for c in range(6)}
    stages: list[int] = []

    def send(payloads: dict[int, dict]) -> dict[int, Message]:
        out = {}
        for c, p in payloads.items():
            stage = int(p["task"]["secagg-stage"])
            stages.append(stage)
            content = RecordDict({"task": ConfigRecord(p["task"])})
            for key, record in p.items():
                if key != "task":
                    content[key] = record
            if (c, stage) == (4, 3):
                continue  # gone while training
            # a LoRA client sends each rank slice's weight beside its delta (fedpeft.federation.ranks)
            metrics = {"num-examples": weights[c], "train_loss": float(c), "train_seconds": 1.0, "rank": 2.0,
                       "rank_slots": 2.0}  # fmt: skip
            reply = handle(
                dict(content["task"]),
                content,
                states[c],
                c,
                lambda c=c, m=metrics: (flatten({B: deltas[c]}, [B]), weights[c], m),
            )
            out[c] = Message(reply, reply_to=Message(content, dst_node_id=c + 1, message_type="train"))
        return out

    state = _state()
    new, m = secure_round(state, _cfg(min_clients=2), NAMES, weights, list(range(6)), send)
    survivors = [0, 1, 2, 3, 5]
    expected = np.average([deltas[c] for c in survivors], axis=0, weights=[weights[c] for c in survivors])
    assert new.round == 1 and sorted(set(stages)) == [1, 2, 3, 4, 5]
    np.testing.assert_allclose(new.arrays[B], expected, atol=1e-7)  # FedAvg, server lr 1, from zeros
    np.testing.assert_array_equal(new.arrays["x.lora_A.weight"], state.arrays["x.lora_A.weight"])
    assert m["secagg"] is True and m["skipped"] is False and m["round"] == 1
    assert m["accepted"] == [NAMES[c] for c in survivors]
    assert m["rejected"] == [{"client": "user4", "reason": "dropped at stage 3"}]
    assert m["train_loss"] == pytest.approx(
        sum(c * weights[c] for c in survivors) / sum(weights[c] for c in survivors)
    )
    assert m["bytes_down"] == 32 * 6 and m["bytes_up"] > 4 * (8 + 2 + 1) * 5 and "ranks" not in m


def test_too_few_sampled_clients_abort_before_any_message() -> None:
    def send(payloads: dict[int, dict]) -> dict[int, Message]:
        raise AssertionError("nothing may be sent")

    state = _state()
    new, m = secure_round(state, _cfg(min_clients=3), NAMES, {0: 1.0, 1: 1.0}, [0, 1], send)
    assert new.round == 1 and new.arrays is state.arrays
    assert m["skipped"] is True and m["accepted"] == [] and m["rejected"] == []
    assert m["abort"] == "2 clients on the federation's base < min_clients 3"
