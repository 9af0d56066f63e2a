"""SecAgg+ over Flower's Message API, the client's side: one handler per stage, dispatched on
task["secagg-stage"] (the server sends them from fedpeft.secagg.server_stages; the client's state machine
is fedpeft.secagg.protocol).

The client keeps its protocol state in the node's context.state between stages (bytes; a SuperNode may
use a fresh process per message). It trains in stage 3, right after it has checked it will mask with
enough live neighbours and right before masking.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedpeft.config.secagg_bounds import MIN_NEIGHBOURS
from fedpeft.privacy.distributed import DistributedCode
from fedpeft.secagg.protocol import (
    SecAggAbort,
    SecAggClient,
    SecAggRefused,
    dump_client,
    load_client,
)
from fedpeft.secagg.quantize import RingCode
from fedpeft.secagg.records import bytes_record, from_bytes_record, ints, parse_ints

STATE_KEY = "secagg"
SENT_KEY = "secagg-sent"  # the rounds of this run this node sent a masked input for (kept across rounds)
LAST_STAGE = 5  # after it, the round is over: the client forgets its keys

# trains and returns (flat delta [D], weight, metrics)
LocalUpdate = Callable[[], tuple[np.ndarray, float, dict[str, float]]]


@dataclass(frozen=True)
class _Device:
    """What the device brings to every stage: its id, its training, and its own limits (never the server's)."""

    me: int
    local_update: LocalUpdate
    rounding_seed: int | None
    min_neighbours: int
    dp_clip: float
    min_local_noise: float


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
    code = RingCode(
        float(task["clip"]),
        int(task["max-clients"]),
        float(task["max-weight"]),
        int(task.get("rank-slots", 0)),
        int(task.get("rank-cap", 0)),
    )
    if not 0 <= code.rank_cap <= code.slots < 2**16:
        raise SecAggRefused(f"refused: invalid rank slots {code.slots} (cap {code.rank_cap})")
    if not (code.clip > 0 and 1 <= code.max_clients < 2**30 and code.max_weight > 0):
        raise SecAggRefused(f"refused: invalid encoding parameters (clip {code.clip}, max-clients "
                            f"{code.max_clients}, max-weight {code.max_weight})")  # fmt: skip
    return code


def _advertise(task: dict[str, Any], state: RecordDict, tag: bytes, device: _Device) -> RecordDict:
    """Stage 1: fresh keys for this round's graph."""
    if STATE_KEY in state:
        old = load_client(bytes(state[STATE_KEY]["client"]))
        # advertising again before anything was shared reveals nothing (a server that lost keys this
        # client advertised ahead asks again); past that, a second session of one round is refused
        if old.tag == tag and old.stage > 1:
            raise SecAggRefused(f"refused: stage 1 of a round client {device.me} has already begun")
    state.pop(STATE_KEY, None)  # a new round: forget anything left of an unfinished one
    # the id this session's graph gives us (in fedpeft it is our client index anyway)
    client = SecAggClient(
        int(task.get("me", device.me)),
        parse_ints(task["neighbours"]),
        int(task["t"]),
        tag,
        device.min_neighbours,
    )
    c_pk, s_pk, v_pk = client.advertise()
    state[STATE_KEY] = ConfigRecord({"client": dump_client(client)})
    return RecordDict({"keys": ConfigRecord({"c": c_pk, "s": s_pk, "v": v_pk})})


def _share_keys(
    client: SecAggClient, task: dict[str, Any], content: RecordDict, state: RecordDict, device: _Device
) -> RecordDict:
    """Stage 2: Shamir shares of this client's secrets, encrypted for each neighbour."""
    keys = {int(j): (bytes(v)[:32], bytes(v)[32:64], bytes(v)[64:]) for j, v in content["pubkeys"].items()}
    out, commitment = client.share_keys(keys)
    return RecordDict({"shares": bytes_record(out), "commitment": ConfigRecord({"b": commitment})})


def _masked_input(
    client: SecAggClient, task: dict[str, Any], content: RecordDict, state: RecordDict, device: _Device
) -> RecordDict:
    """Stage 3: train, then send the update encoded and masked (once per round of this run)."""
    me, rnd = device.me, str(task.get("round", ""))
    sent = parse_ints(state[SENT_KEY]["rounds"]) if SENT_KEY in state else []
    if rnd and int(rnd) in sent:  # another session of the same round could difference our inputs
        raise SecAggRefused(f"refused: client {me} already sent a masked input for round {rnd}")
    code = _stage3_code(task, device.dp_clip, device.min_local_noise)
    malformed = client.accept_shares(from_bytes_record(content["ciphertexts"]), parse_ints(task["alive"]))
    delta, weight, metrics = device.local_update()
    if not np.all(np.isfinite(delta)):
        raise SecAggAbort(f"client {me}: non-finite update, not sent")
    # the stochastic rounding needs no secrecy (the masks and the noise hide the input); seeding it keeps
    # runs reproducible. The DP noise does: it comes from the OS.
    rounding = np.random.default_rng(device.rounding_seed)
    mine = int(metrics.pop("rank_slots", 0))  # this device's LoRA rank over what travels (0: none)
    if isinstance(code, RingCode) and code.slots != mine:
        raise SecAggAbort(
            f"client {me}: the round encodes {code.slots} rank slots, this adapter's rank is {mine}"
        )
    if isinstance(code, DistributedCode):
        if len(delta) + 1 != code.dim:
            raise SecAggAbort(f"client {me}: update of {len(delta)} values, the round encodes {code.dim - 1}")
        clipped = metrics.pop("dp_clipped", 0.0) > 0  # summed securely, never sent in the clear
        noise = np.random.default_rng(secrets.randbits(128))
        y = client.mask(code.encode(delta, clipped, rounding, noise))
    else:
        if code.slots:  # each rank slice's weight, summed beside the delta (fedpeft.federation.ranks)
            rank = min(metrics.get("rank", code.slots), code.rank_cap or code.slots)
            delta = np.concatenate([delta, code.clip * (np.arange(code.slots) < rank)])
        y = client.mask(code.encode(delta, weight, rounding))
    if rnd:
        state[SENT_KEY] = ConfigRecord({"rounds": ints([*sent, int(rnd)][-64:])})
    return RecordDict(
        {
            "masked": ArrayRecord({"y": Array(y)}),
            "info": ConfigRecord({"malformed": ints(malformed)}),
            "metrics": ConfigRecord(metrics),
        }
    )


def _sign_survivors(
    client: SecAggClient, task: dict[str, Any], content: RecordDict, state: RecordDict, device: _Device
) -> RecordDict:
    """Stage 4: sign the survivor set (once)."""
    signature = client.sign_survivors(parse_ints(task["survivors"]))
    return RecordDict({"consistency": ConfigRecord({"signature": signature})})


def _reveal(
    client: SecAggClient, task: dict[str, Any], content: RecordDict, state: RecordDict, device: _Device
) -> RecordDict:
    """Stage 5: the shares that remove the masks, once enough share holders confirmed the same survivors."""
    signatures = from_bytes_record(content["signatures"])
    b, s = client.unmask(parse_ints(task["survivors"]), parse_ints(task["dropped"]), signatures)
    return RecordDict({"b": bytes_record(b), "s": bytes_record(s)})


StageHandler = Callable[[SecAggClient, dict[str, Any], RecordDict, RecordDict, _Device], RecordDict]
STAGES: dict[int, StageHandler] = {2: _share_keys, 3: _masked_input, 4: _sign_survivors, LAST_STAGE: _reveal}


def _resume(state: RecordDict, stage: int, tag: bytes, me: int) -> SecAggClient:
    """This round's client from the node state, moved to `stage` (each stage runs once, in order)."""
    if STATE_KEY not in state:
        raise SecAggAbort(f"client {me}: stage {stage} without stage 1")
    client = load_client(bytes(state[STATE_KEY]["client"]))
    if client.tag != tag:
        raise SecAggAbort(f"client {me}: message from another round")
    if stage != client.stage + 1:
        raise SecAggRefused(f"refused: stage {stage} after stage {client.stage} (each runs once, in order)")
    client.stage = stage
    return client


def handle(
    task: dict[str, Any],
    content: RecordDict,
    state: RecordDict,
    me: int,
    local_update: LocalUpdate,
    rounding_seed: int | None = None,
    min_neighbours: int = MIN_NEIGHBOURS,
    dp_clip: float = 0.0,
    min_local_noise: float = 0.0,
) -> RecordDict:
    """One stage on the client. `local_update()` trains and returns (flat delta [D], weight, metrics); it is
    called in stage 3 only, after the device's own checks. `min_neighbours` is the device's floor, never
    the server's; so is `min_local_noise` (distributed DP: the least noise this device adds itself, over
    its sensitivity; > 0 refuses a round without it). `dp_clip`: the L2 norm the device clips to. Raises
    SecAggRefused (a one-line refusal, nothing sent) when a request would weaken this device's
    protection, SecAggAbort on other protocol violations (the reply becomes an error)."""
    stage = int(task["secagg-stage"])
    tag = bytes(task["tag"])
    device = _Device(me, local_update, rounding_seed, min_neighbours, dp_clip, min_local_noise)
    if stage == 1:
        return _advertise(task, state, tag, device)
    client = _resume(state, stage, tag, me)
    if stage not in STAGES:
        raise SecAggAbort(f"unknown secagg stage {stage}")
    reply = STAGES[stage](client, task, content, state, device)
    if stage == LAST_STAGE:
        del state[STATE_KEY]  # the round is over: forget the keys
    else:
        state[STATE_KEY] = ConfigRecord({"client": dump_client(client)})
    return reply
