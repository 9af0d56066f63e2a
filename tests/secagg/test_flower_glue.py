"""The SecAgg+ message glue without Ray: real Flower records, a node state per client, in one process."""

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, RecordDict

from fedpeft.secagg.flower import SecAggParams, flatten, handle, secure_sum, unflatten
from fedpeft.secagg.protocol import SecAggAbort
from fedpeft.secagg.quantize import RingCode


@pytest.fixture(autouse=True)
def task_identity() -> None:
    """Flower stamps messages with the running task's identity; its simulation engine sets it, so do we."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1


def _run(
    n: int, k: int, vectors: dict[int, np.ndarray], weights: dict[int, float], fail: set[tuple[int, int]]
):
    states = {c: RecordDict() for c in range(n)}

    def send(payloads: dict[int, dict]) -> dict[int, Message]:
        out = {}
        for c, p in payloads.items():
            content = RecordDict({"task": ConfigRecord(p["task"])})
            for key, record in p.items():
                if key != "task":
                    content[key] = record
            msg = Message(content, dst_node_id=c + 1, message_type="train")
            if (c, int(p["task"]["secagg-stage"])) in fail:
                continue  # this client is gone: no reply at all
            reply = handle(
                dict(content["task"]),
                content,
                states[c],
                c,
                lambda c=c: (vectors[c], weights[c], {"num-examples": weights[c]}),
            )
            out[c] = Message(reply, reply_to=msg)
        return out

    dim = len(vectors[0])
    code = RingCode(clip=0.01, max_clients=n, max_weight=max(weights.values()))
    total, survivors, report = secure_sum(
        send, list(range(n)), dim + 1, code, SecAggParams(k, None), b"tag", 0
    )
    weighted, weight = code.decode_sum(total)
    return weighted / weight, survivors, report, states


def test_weighted_mean_through_real_records_with_a_dropout() -> None:
    rng = np.random.default_rng(0)
    n, dim = 6, 500
    vectors = {c: rng.uniform(-0.01, 0.01, dim) for c in range(n)}
    weights = {c: float(100 + 50 * c) for c in range(n)}
    mean, survivors, report, states = _run(n, 5, vectors, weights, fail={(4, 3)})
    assert survivors == [0, 1, 2, 3, 5] and report["dropped"] == {4: "stage 3"}
    expected = np.average([vectors[c] for c in survivors], axis=0, weights=[weights[c] for c in survivors])
    np.testing.assert_allclose(mean, expected, atol=1e-8)
    assert all("secagg" not in states[c] for c in survivors)  # keys forgotten after the round


def test_stage_without_setup_is_refused() -> None:
    task = {"secagg-stage": 2, "tag": b"t", "t": 2}
    with pytest.raises(SecAggAbort, match="without stage 1"):
        handle(task, RecordDict(), RecordDict(), 0, lambda: (np.zeros(1), 1.0, {}))


def test_flatten_and_unflatten_keep_names_and_shapes() -> None:
    arrays = {"b": np.arange(6, dtype=np.float32).reshape(2, 3), "a": np.ones(2, np.float32)}
    schema = [["a", [2], "float32"], ["b", [2, 3], "float32"]]
    back = unflatten(flatten(arrays, ["a", "b"]), schema, ["a", "b"])
    for k in arrays:
        np.testing.assert_array_equal(back[k], arrays[k])
