"""SecAgg+ over Flower's Message API: the server's five stages as `train` messages, and the client's handler.

Every stage message carries task["secagg-stage"] (1-5). The client keeps its protocol state in the node's
context.state between stages (bytes; a SuperNode may use a fresh process per message). Training happens
in stage 3, right after the client has checked it will mask with enough live neighbours and right before
masking, so a client that drops during training is a stage-3 dropout.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from fedpeft.privacy.distributed import DistributedCode
from fedpeft.secagg.graph import neighbours as make_graph
from fedpeft.secagg.protocol import (
    MIN_NEIGHBOURS,
    Keys,
    SecAggAbort,
    SecAggClient,
    SecAggRefused,
    default_threshold,
    dump_client,
    load_client,
)
from fedpeft.secagg.protocol_server import SecAggServer
from fedpeft.secagg.quantize import RingCode

log = logging.getLogger("fedpeft")
STATE_KEY = "secagg"
SENT_KEY = "secagg-sent"  # the rounds of this run this node sent a masked input for (kept across rounds)


@dataclass(frozen=True)
class SecAggParams:
    k: int  # neighbours per client (k >= n - 1: complete graph)
    threshold: int | None  # None -> a majority of each secret's k + 1 holders


def flatten(arrays: dict[str, np.ndarray], keys: list[str]) -> np.ndarray:
    return np.concatenate([arrays[k].ravel() for k in keys]).astype(np.float64)


def unflatten(vector: np.ndarray, schema: list[list[Any]], keys: list[str]) -> dict[str, np.ndarray]:
    shapes = {n: tuple(s) for n, s, _ in schema}
    out, at = {}, 0
    for k in keys:
        size = int(np.prod(shapes[k]))
        out[k] = vector[at : at + size].reshape(shapes[k]).astype(np.float32)
        at += size
    return out


def ints(values: list[int]) -> str:
    """Lists of ids travel as text: Flower records cannot hold an empty list."""
    return ",".join(str(v) for v in values)


def parse_ints(text: Any) -> list[int]:
    return [int(v) for v in str(text).split(",") if v]


def _bytes_record(d: dict[int, bytes]) -> ConfigRecord:
    return ConfigRecord({str(k): v for k, v in d.items()})


def _from_bytes_record(r: ConfigRecord) -> dict[int, bytes]:
    return {int(k): bytes(v) for k, v in r.items()}


# --- server ------------------------------------------------------------------------------------------


def stage1_tasks(
    clients: list[int], params: SecAggParams, tag: bytes, seed: int
) -> dict[int, dict[str, Any]]:
    """Each client's stage-1 task (advertise keys for this graph): the same whether it travels as stage 1
    or ahead of its round, folded into the previous round's last message (`advertised` below)."""
    t = params.threshold or default_threshold(params.k, len(clients))
    graph = make_graph(sorted(clients), params.k, seed)
    base = {"tag": tag, "k": params.k, "t": t, "seed": seed, "secagg-stage": 1}
    return {c: {**base, "me": c, "neighbours": ints(graph[c])} for c in clients}


def read_keys(content: RecordDict, record: str = "keys") -> Keys:
    return tuple(bytes(content[record][x]) for x in "csv")  # type: ignore[return-value]


def secure_sum(
    send: Callable[[dict[int, dict[str, Any]]], dict[int, Message]],
    clients: list[int],
    dim: int,
    code: RingCode | DistributedCode,
    params: SecAggParams,
    tag: bytes,
    seed: int,
    report: dict[str, Any] | None = None,
    advertised: Mapping[int, tuple[dict[str, Any], Keys]] | None = None,
    before_unmask: Callable[[list[int]], None] | None = None,
) -> tuple[np.ndarray, list[int], dict]:
    """Run the five stages with `clients`; `send({client: records})` delivers one message per client and
    returns the replies by client (an error reply counts as a dropout). Returns (ring sum of the survivors'
    inputs [dim] uint32, survivors, report). Raises SecAggAbort when too few survive a stage; a `report`
    passed in holds what happened so far (who dropped or refused, at which stage, and why).

    `advertised` holds keys clients already advertised for this round ({client: (the stage-1 task it
    answered, its keys)}, see stage1_tasks); stage 1 then goes only to the others, and not at all when
    every client advertised ahead: one message round trip less per round. `before_unmask(survivors)` runs
    once the masked inputs are in, before anything could be unmasked; it raises SecAggAbort to stop there
    (distributed DP: fewer survivors than the budget allows)."""
    report = {} if report is None else report
    report.update(dropped={}, bytes_up_keys=0, excluded={})
    n = len(clients)
    t = params.threshold or default_threshold(params.k, n)
    server = SecAggServer(sorted(clients), params.k, t, tag, dim, seed)
    report.update(k=min(params.k, n - 1), t=t)
    tasks = stage1_tasks(clients, params, tag, seed)
    ahead = {c: keys for c, (task, keys) in (advertised or {}).items() if c in tasks and task == tasks[c]}
    report["advertised_ahead"] = len(ahead)
    report["stages"] = 5 if len(ahead) < len(clients) else 4  # message round trips this round takes

    def ok(replies: dict[int, Message], stage: int, asked: list[int] = clients) -> dict[int, Message]:
        good = {c: m for c, m in replies.items() if not m.has_error()}
        for c in set(asked) - set(good):
            reason = replies[c].error.reason.strip().splitlines()[-1][:300] if c in replies else ""
            report["dropped"].setdefault(c, f"stage {stage}" + (f" ({reason})" if reason else ""))
        return good

    def parsed(replies: dict[int, Message], stage: int, read: Callable[[RecordDict], Any]) -> dict[int, Any]:
        """What each reply carries; a malformed reply drops its client, not the round."""
        out = {}
        for c, m in replies.items():
            try:
                out[c] = read(m.content)
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                report["dropped"].setdefault(
                    c, f"stage {stage} (malformed reply: {type(e).__name__} {e})"[:300]
                )
        return out

    base = {"tag": tag, "k": params.k, "t": t, "seed": seed}
    rest = [c for c in clients if c not in ahead]
    r1 = ok(send({c: {"task": tasks[c]} for c in rest}), 1, rest) if rest else {}
    keys = {**ahead, **parsed(r1, 1, read_keys)}
    keys_for = server.receive_keys(keys)
    report["bytes_up_keys"] += 96 * len(keys)

    r2 = ok(
        send(
            {
                c: {
                    "task": {**base, "secagg-stage": 2},
                    "pubkeys": ConfigRecord({str(j): b"".join(pk) for j, pk in keys_for[c].items()}),
                }
                for c in keys_for
            }
        ),
        2,
    )
    shares = parsed(
        r2, 2, lambda content: (_from_bytes_record(content["shares"]), bytes(content["commitment"]["b"]))
    )
    report["bytes_up_keys"] += sum(len(ct) for out, _ in shares.values() for ct in out.values()) + 32 * len(
        shares
    )
    routed = server.receive_shares(shares)

    stage3 = {"secagg-stage": 3, **code.to_task()}
    r3 = ok(
        send(
            {
                c: {"task": {**base, **stage3, "alive": ints(alive)}, "ciphertexts": _bytes_record(cts)}
                for c, (cts, alive) in routed.items()
            }
        ),
        3,
    )

    def read_input(content: RecordDict) -> tuple[np.ndarray, list[int], dict[str, float]]:
        metrics = {k: float(v) for k, v in content["metrics"].items()}
        if not all(np.isfinite(v) for v in metrics.values()):
            raise ValueError(f"non-finite metrics {metrics}")
        return content["masked"]["y"].numpy(), parse_ints(content["info"]["malformed"]), metrics

    read = parsed(r3, 3, read_input)
    survivors, dropped = server.receive_inputs({c: (y, bad) for c, (y, bad, _) in read.items()})
    report["excluded"] = dict(server.excluded)
    report["train_metrics"] = {c: read[c][2] for c in survivors}
    if before_unmask is not None:
        before_unmask(survivors)

    # stage 4: every survivor signs the survivor set; a survivor gone from here on still counts in the sum
    r4 = ok(
        send({c: {"task": {**base, "secagg-stage": 4, "survivors": ints(survivors)}} for c in survivors}), 4
    )
    signatures = server.receive_signatures(
        survivors, parsed(r4, 4, lambda content: bytes(content["consistency"]["signature"]))
    )
    report["bytes_up_keys"] += 64 * len(r4)
    stage5 = {**base, "secagg-stage": 5, "survivors": ints(survivors), "dropped": ints(dropped)}
    r5 = ok(
        send({c: {"task": stage5, "signatures": _bytes_record(signatures)} for c in r4 if c in signatures}), 5
    )
    replies = parsed(
        r5, 5, lambda content: (_from_bytes_record(content["b"]), _from_bytes_record(content["s"]))
    )
    report["bytes_up_keys"] += sum(len(v) for b, s in replies.values() for v in (*b.values(), *s.values()))
    total = server.unmask(survivors, dropped, replies)
    report["survivors"] = survivors
    return total, survivors, report


# --- client ------------------------------------------------------------------------------------------


def _stage3_code(task: dict[str, Any], dp_clip: float, min_local_noise: float) -> RingCode | DistributedCode:
    """The encoding a stage-3 task asks for, checked by the device before it trains (SecAggRefused)."""
    if "dp-granularity" in task:
        try:
            code = DistributedCode.from_task(task, dp_clip, int(task["dp-dim"]))
        except (KeyError, TypeError, ValueError) as e:
            raise SecAggRefused(f"refused: invalid distributed-DP parameters ({e})") from None
        if code.local_multiplier < min_local_noise:
            raise SecAggRefused(
                f"refused: the round asks this device for noise {code.local_multiplier:.3g} x its sensitivity; "
                f"it adds at least {min_local_noise:g} (--dp-min-local-noise)"
            )
        return code
    if min_local_noise > 0:
        raise SecAggRefused(
            "refused: a secure round without distributed DP noise; this device adds its own noise "
            f"(--dp-min-local-noise {min_local_noise:g})"
        )
    code = RingCode(float(task["clip"]), int(task["max-clients"]), float(task["max-weight"]))
    if not (code.clip > 0 and 1 <= code.max_clients < 2**30 and code.max_weight > 0):
        raise SecAggRefused(f"refused: invalid encoding parameters (clip {code.clip}, max-clients "
                            f"{code.max_clients}, max-weight {code.max_weight})")  # fmt: skip
    return code


def handle(
    task: dict[str, Any],
    content: RecordDict,
    state: RecordDict,
    me: int,
    local_update: Callable[[], tuple[np.ndarray, float, dict[str, float]]],
    rounding_seed: int | None = None,
    min_neighbours: int = MIN_NEIGHBOURS,
    dp_clip: float = 0.0,
    min_local_noise: float = 0.0,
) -> RecordDict:
    """One stage on the client. `local_update()` trains and returns (flat delta [D], weight, metrics); it is
    called in stage 3 only, after the device's own checks. `min_neighbours` is the device's floor, never
    the server's; so is `min_local_noise` (distributed DP: the least noise this device adds itself, over
    its sensitivity; > 0 refuses a round without it). `dp_clip`: the L2 norm the device clips to. Raises SecAggRefused (a one-line refusal, nothing sent) when a request would weaken this
    device's protection, SecAggAbort on other protocol violations (the reply becomes an error)."""
    stage = int(task["secagg-stage"])
    tag = bytes(task["tag"])
    if stage == 1:
        if STATE_KEY in state:
            old = load_client(bytes(state[STATE_KEY]["client"]))
            # advertising again before anything was shared reveals nothing (a server that lost keys this
            # client advertised ahead asks again); past that, a second session of one round is refused
            if old.tag == tag and old.stage > 1:
                raise SecAggRefused(f"refused: stage 1 of a round client {me} has already begun")
        state.pop(STATE_KEY, None)  # a new round: forget anything left of an unfinished one
        # the id this session's graph gives us (in fedpeft it is our client index anyway)
        client = SecAggClient(
            int(task.get("me", me)), parse_ints(task["neighbours"]), int(task["t"]), tag, min_neighbours
        )
        c_pk, s_pk, v_pk = client.advertise()
        state[STATE_KEY] = ConfigRecord({"client": dump_client(client)})
        return RecordDict({"keys": ConfigRecord({"c": c_pk, "s": s_pk, "v": v_pk})})
    if STATE_KEY not in state:
        raise SecAggAbort(f"client {me}: stage {stage} without stage 1")
    client = load_client(bytes(state[STATE_KEY]["client"]))
    if client.tag != tag:
        raise SecAggAbort(f"client {me}: message from another round")
    if stage != client.stage + 1:
        raise SecAggRefused(f"refused: stage {stage} after stage {client.stage} (each runs once, in order)")
    client.stage = stage
    if stage == 2:
        keys = {
            int(j): (bytes(v)[:32], bytes(v)[32:64], bytes(v)[64:]) for j, v in content["pubkeys"].items()
        }
        out, commitment = client.share_keys(keys)
        reply = RecordDict({"shares": _bytes_record(out), "commitment": ConfigRecord({"b": commitment})})
    elif stage == 3:
        rnd = str(task.get("round", ""))
        sent = parse_ints(state[SENT_KEY]["rounds"]) if SENT_KEY in state else []
        if rnd and int(rnd) in sent:  # another session of the same round could difference our inputs
            raise SecAggRefused(f"refused: client {me} already sent a masked input for round {rnd}")
        code = _stage3_code(task, dp_clip, min_local_noise)
        malformed = client.accept_shares(
            _from_bytes_record(content["ciphertexts"]), parse_ints(task["alive"])
        )
        delta, weight, metrics = local_update()
        if not np.all(np.isfinite(delta)):
            raise SecAggAbort(f"client {me}: non-finite update, not sent")
        # the stochastic rounding needs no secrecy (the masks and the noise hide the input); seeding it keeps
        # runs reproducible. The DP noise does: it comes from the OS.
        rounding = np.random.default_rng(rounding_seed)
        if isinstance(code, DistributedCode):
            if len(delta) + 1 != code.dim:
                raise SecAggAbort(
                    f"client {me}: update of {len(delta)} values, the round encodes {code.dim - 1}"
                )
            clipped = metrics.pop("dp_clipped", 0.0) > 0  # summed securely, never sent in the clear
            noise = np.random.default_rng(secrets.randbits(128))
            y = client.mask(code.encode(delta, clipped, rounding, noise))
        else:
            y = client.mask(code.encode(delta, weight, rounding))
        if rnd:
            state[SENT_KEY] = ConfigRecord({"rounds": ints([*sent, int(rnd)][-64:])})
        reply = RecordDict(
            {
                "masked": ArrayRecord({"y": Array(y)}),
                "info": ConfigRecord({"malformed": ints(malformed)}),
                "metrics": ConfigRecord(metrics),
            }
        )
    elif stage == 4:
        signature = client.sign_survivors(parse_ints(task["survivors"]))
        reply = RecordDict({"consistency": ConfigRecord({"signature": signature})})
    elif stage == 5:
        signatures = _from_bytes_record(content["signatures"])
        b, s = client.unmask(parse_ints(task["survivors"]), parse_ints(task["dropped"]), signatures)
        reply = RecordDict({"b": _bytes_record(b), "s": _bytes_record(s)})
        del state[STATE_KEY]  # the round is over: forget the keys
        return reply
    else:
        raise SecAggAbort(f"unknown secagg stage {stage}")
    state[STATE_KEY] = ConfigRecord({"client": dump_client(client)})
    return reply
