"""The SecAgg+ message glue without Ray: real Flower records, a node state per client, in one process."""

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, RecordDict

from fedpeft.secagg.client_stages import handle
from fedpeft.secagg.protocol import SecAggAbort
from fedpeft.secagg.quantize import RingCode
from fedpeft.secagg.records import flatten, unflatten
from fedpeft.secagg.server_stages import SecAggParams, secure_sum, stage1_tasks


@pytest.fixture(autouse=True)
def task_identity() -> None:
    """Flower stamps messages with the running task's identity; its simulation engine sets it, so do we."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1


def _run(
    n: int,
    k: int,
    vectors: dict[int, np.ndarray],
    weights: dict[int, float],
    fail: set[tuple[int, int]],
    mangle=None,
    advertised=None,
    states=None,
    stages=None,
):
    states = states if states is not None else {c: RecordDict() for c in range(n)}

    def send(payloads: dict[int, dict]) -> dict[int, Message]:
        out = {}
        for c, p in payloads.items():
            content = RecordDict({"task": ConfigRecord(p["task"])})
            for key, record in p.items():
                if key != "task":
                    content[key] = record
            msg = Message(content, dst_node_id=c + 1, message_type="train")
            if stages is not None:
                stages.append((c, int(p["task"]["secagg-stage"])))
            if (c, int(p["task"]["secagg-stage"])) in fail:
                continue  # this client is gone: no reply at all
            reply = handle(
                dict(content["task"]),
                content,
                states[c],
                c,
                lambda c=c: (vectors[c], weights[c], {"num-examples": weights[c]}),
            )
            if mangle is not None:
                reply = mangle(c, int(p["task"]["secagg-stage"]), reply)
            out[c] = Message(reply, reply_to=msg)
        return out

    dim = len(vectors[0])
    code = RingCode(clip=0.01, max_clients=n, max_weight=max(weights.values()))
    total, survivors, report = secure_sum(
        send, list(range(n)), dim + 1, code, SecAggParams(k, None), b"tag", 0, advertised=advertised
    )
    weighted, weight = code.decode_sum(total)
    return weighted / weight, survivors, report, states


def test_weighted_mean_through_real_records_with_a_dropout() -> None:
    rng = np.random.default_rng(0)
    n, dim = 6, 500
    vectors = {c: rng.uniform(-0.01, 0.01, dim) for c in range(n)}
    weights = {c: float(100 + 50 * c) for c in range(n)}
    mean, survivors, report, states = _run(n, 5, vectors, weights, fail={(4, 3)})
    assert survivors == [0, 1, 2, 3, 5] and report.dropped == {4: "stage 3"}
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


def test_the_k0_t1_attack_is_refused_before_any_update_leaves_a_client() -> None:
    """k = 0 gave every client no neighbours and t = 1 let the server rebuild each self-mask seed from its
    normal stage-4 request: it read every delta exactly. Now no entry accepts those parameters, and a server
    that sends them anyway gets one-line refusals from the real ClientApp and nothing else."""
    from flwr.app import Context

    from fedpeft.config.files import from_run_config, to_run_config
    from fedpeft.config.tree import FederationConfig, RunConfig
    from fedpeft.errors import FedpeftError
    from fedpeft.flower.client_app import train

    bad = {**to_run_config(RunConfig(federation=FederationConfig(secagg=True))), "federation.secagg_k": 0}
    with pytest.raises(FedpeftError, match="--secagg-k must be at least 2"):
        from_run_config(bad)
    bad = {
        **to_run_config(RunConfig(federation=FederationConfig(secagg=True))),
        "federation.secagg_threshold": 1,
    }
    with pytest.raises(FedpeftError, match="--secagg-threshold must be 4 to 5"):
        from_run_config(bad)

    # a server that skips our checks: a valid run config, crafted stage messages
    config = ConfigRecord(to_run_config(RunConfig(federation=FederationConfig(clients=5, secagg=True))))
    states = {c: RecordDict() for c in range(5)}
    received: list[Message] = []

    def send(payloads: dict[int, dict]) -> dict[int, Message]:
        out = {}
        for c, p in payloads.items():
            content = RecordDict(
                {"config": config, "task": ConfigRecord({**p["task"], "round": 1, "client": c})}
            )
            for key, record in p.items():
                if key != "task":
                    content[key] = record
            msg = Message(content, dst_node_id=c + 1, message_type="train")
            out[c] = train(msg, Context(1, c + 1, {"partition-id": c}, states[c], {}))
            received.append(out[c])
        return out

    code = RingCode(clip=0.01, max_clients=5, max_weight=1.0)
    for k, t in ((0, 1), (4, 1), (4, 2)):
        received.clear()
        with pytest.raises(SecAggAbort):
            secure_sum(send, list(range(5)), 11, code, SecAggParams(k, t), b"tag", 0)
        assert len(received) == 5  # stage 1 only: nothing was trained, masked or revealed
        for reply in received:
            assert reply.has_error() and reply.error.reason.startswith("refused:"), reply.error.reason
            assert "\n" not in reply.error.reason  # one line, no traceback


def test_a_device_that_requires_secagg_refuses_a_plain_round() -> None:
    from flwr.app import Context

    from fedpeft.config.files import to_run_config
    from fedpeft.config.tree import RunConfig
    from fedpeft.flower.client_app import train

    content = RecordDict(
        {
            "config": ConfigRecord(to_run_config(RunConfig())),
            "task": ConfigRecord({"round": 1, "client": 0}),
        }
    )
    node = {"data-path": "/nonexistent", "require-secagg": True}
    reply = train(
        Message(content, dst_node_id=1, message_type="train"), Context(1, 1, node, RecordDict(), {})
    )
    assert reply.has_error() and "refused: a plain training round" in reply.error.reason
    assert not reply.has_content()


def test_a_malformed_reply_drops_its_client_not_the_round() -> None:
    rng = np.random.default_rng(1)
    n, dim = 6, 50
    vectors = {c: rng.uniform(-0.01, 0.01, dim) for c in range(n)}
    weights = {c: 100.0 for c in range(n)}

    def mangle(c: int, stage: int, reply: RecordDict) -> RecordDict:
        if (c, stage) == (2, 1):
            del reply["keys"]  # a reply without the record the server reads
        if (c, stage) == (3, 3):
            reply["metrics"] = ConfigRecord({"num-examples": float("nan")})
        return reply

    mean, survivors, report, _ = _run(n, n - 1, vectors, weights, fail=set(), mangle=mangle)
    assert survivors == [0, 1, 4, 5]
    assert "malformed reply" in report.dropped[2] and "non-finite" in report.dropped[3]
    np.testing.assert_allclose(mean, np.mean([vectors[c] for c in survivors], axis=0), atol=1e-8)


def test_keys_advertised_ahead_skip_stage_1_and_leave_the_sum_unchanged() -> None:
    """The next round's stage 1 rides on the previous round's last message: clients that advertised
    ahead start at stage 2. An advertisement for another graph is not used: that client is asked again in
    a stage-1 message, which it answers (nothing was shared yet)."""
    rng = np.random.default_rng(2)
    n, dim = 5, 50
    vectors = {c: rng.uniform(-0.01, 0.01, dim) for c in range(n)}
    weights = {c: 1.0 for c in range(n)}
    tasks = stage1_tasks(list(range(n)), SecAggParams(2, None), b"tag", 0)
    states = {c: RecordDict() for c in range(n)}
    advertised = {}
    for c in (0, 1, 2, 3):
        task = tasks[c] if c != 3 else {**tasks[c], "neighbours": "0,1"}  # 3 answered another graph
        keys = handle(dict(task), RecordDict(), states[c], c, lambda: None)["keys"]
        advertised[c] = (task, tuple(bytes(keys[x]) for x in "csv"))
    stages: list[tuple[int, int]] = []
    mean, survivors, report, _ = _run(
        n, 2, vectors, weights, set(), advertised=advertised, states=states, stages=stages
    )
    assert [c for c, stage in stages if stage == 1] == [3, 4]
    assert report.advertised_ahead == 3 and survivors == list(range(n))
    np.testing.assert_allclose(mean, np.mean([vectors[c] for c in range(n)], axis=0), atol=1e-8)
    # all advertised ahead: no stage-1 message at all
    states = {c: RecordDict() for c in range(n)}
    advertised = {
        c: (
            tasks[c],
            tuple(
                bytes(v)
                for v in handle(dict(tasks[c]), RecordDict(), states[c], c, lambda: None)["keys"].values()
            ),
        )
        for c in range(n)
    }
    stages.clear()
    _run(n, 2, vectors, weights, set(), advertised=advertised, states=states, stages=stages)
    assert {stage for _, stage in stages} == {2, 3, 4, 5}


def test_a_second_stage_1_after_keys_were_shared_is_refused() -> None:
    from fedpeft.secagg.protocol import SecAggRefused

    tasks = stage1_tasks([0, 1, 2], SecAggParams(2, None), b"tag", 0)
    states = [RecordDict() for _ in range(3)]
    keys = {c: handle(dict(tasks[c]), RecordDict(), states[c], c, lambda: None)["keys"] for c in range(3)}
    handle(dict(tasks[0]), RecordDict(), states[0], 0, lambda: None)  # again, before sharing: fine
    keys[0] = handle(dict(tasks[0]), RecordDict(), states[0], 0, lambda: None)["keys"]
    pubkeys = ConfigRecord({str(j): b"".join(bytes(keys[j][x]) for x in "csv") for j in (1, 2)})
    handle({**tasks[0], "secagg-stage": 2}, RecordDict({"pubkeys": pubkeys}), states[0], 0, lambda: None)
    with pytest.raises(SecAggRefused, match="already begun"):
        handle(dict(tasks[0]), RecordDict(), states[0], 0, lambda: None)
