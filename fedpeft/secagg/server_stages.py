"""SecAgg+ over Flower's Message API, the server's side: the five stages as `train` messages, one function
each, and the typed report of what happened. The clients answer in fedpeft.secagg.client_stages; the
server's transport-free state machine is fedpeft.secagg.server_protocol.

Every stage message carries task["secagg-stage"] (1-5). A client trains in stage 3, right after it has
checked it will mask with enough live neighbours and right before masking, so a client that drops during
training is a stage-3 dropout.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict

from fedpeft.privacy.distributed import DistributedCode
from fedpeft.secagg.graph import neighbours as make_graph
from fedpeft.secagg.protocol import Keys, default_threshold
from fedpeft.secagg.quantize import RingCode
from fedpeft.secagg.records import bytes_record, from_bytes_record, ints, parse_ints
from fedpeft.secagg.server_protocol import SecAggServer

# delivers one message per client ({client: records}) and returns the replies by client
Send = Callable[[dict[int, dict[str, Any]]], dict[int, Message]]


@dataclass(frozen=True)
class SecAggParams:
    k: int  # neighbours per client (k >= n - 1: complete graph)
    threshold: int | None  # None -> a majority of each secret's k + 1 holders


@dataclass
class SecureSumReport:
    """What one secure sum saw, filled stage by stage and read also when it aborts. The round's metrics
    (fedpeft.federation.rounds.secure_metrics) read it under these names (as_dict)."""

    dropped: dict[int, str] = field(default_factory=dict)  # client -> "stage N (its error reply's reason)"
    bytes_up_keys: int = 0  # what clients sent besides their masked inputs: keys, shares, signatures
    excluded: dict[int, str] = field(default_factory=dict)  # client -> why the server left its input out
    k: int = 0  # neighbours per client in this round's graph (n - 1: complete)
    t: int = 0  # the threshold
    advertised_ahead: int = 0  # clients whose keys came with the previous round's last message
    stages: int = 5  # message round trips this round takes (4 when every client advertised ahead)
    train_metrics: dict[int, dict[str, float]] = field(default_factory=dict)  # the survivors' figures
    survivors: list[int] = field(default_factory=list)  # whose inputs the sum holds

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def stage1_tasks(
    clients: list[int], params: SecAggParams, tag: bytes, seed: int
) -> dict[int, dict[str, Any]]:
    """Each client's stage-1 task (advertise keys for this graph): the same whether it travels as stage 1
    or ahead of its round, folded into the previous round's last message (secure_sum's `advertised`)."""
    t = params.threshold or default_threshold(params.k, len(clients))
    graph = make_graph(sorted(clients), params.k, seed)
    base = {"tag": tag, "k": params.k, "t": t, "seed": seed, "secagg-stage": 1}
    return {c: {**base, "me": c, "neighbours": ints(graph[c])} for c in clients}


def read_keys(content: RecordDict, record: str = "keys") -> Keys:
    return tuple(bytes(content[record][x]) for x in "csv")  # type: ignore[return-value]


@dataclass
class _Stages:
    """One secure sum's messaging: what every stage's task carries, and who dropped at which stage."""

    send: Send
    clients: list[int]
    server: SecAggServer
    base: dict[str, Any]  # tag, k, t, seed: in every stage's task
    report: SecureSumReport

    def replies(
        self, stage: int, payloads: dict[int, dict[str, Any]], asked: list[int] | None = None
    ) -> dict[int, Message]:
        """Sends `payloads`; the good replies. Each client of `asked` (all by default) without one drops
        at this stage (an error reply counts as a dropout, its reason kept)."""
        replies = self.send(payloads)
        good = {c: m for c, m in replies.items() if not m.has_error()}
        for c in set(self.clients if asked is None else asked) - set(good):
            reason = replies[c].error.reason.strip().splitlines()[-1][:300] if c in replies else ""
            self.report.dropped.setdefault(c, f"stage {stage}" + (f" ({reason})" if reason else ""))
        return good

    def parsed(
        self, replies: dict[int, Message], stage: int, read: Callable[[RecordDict], Any]
    ) -> dict[int, Any]:
        """What each reply carries; a malformed reply drops its client, not the round."""
        out = {}
        for c, m in replies.items():
            try:
                out[c] = read(m.content)
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                self.report.dropped.setdefault(
                    c, f"stage {stage} (malformed reply: {type(e).__name__} {e})"[:300]
                )
        return out


def _advertise(
    s: _Stages, tasks: dict[int, dict[str, Any]], ahead: dict[int, Keys]
) -> dict[int, dict[int, Keys]]:
    """Stage 1: keys from the clients that did not advertise them ahead. Returns each client's neighbours'."""
    rest = [c for c in s.clients if c not in ahead]
    r1 = s.replies(1, {c: {"task": tasks[c]} for c in rest}, rest) if rest else {}
    keys = {**ahead, **s.parsed(r1, 1, read_keys)}
    keys_for = s.server.receive_keys(keys)
    s.report.bytes_up_keys += 96 * len(keys)
    return keys_for


def _read_shares(content: RecordDict) -> tuple[dict[int, bytes], bytes]:
    return from_bytes_record(content["shares"]), bytes(content["commitment"]["b"])


def _share(s: _Stages, keys_for: dict[int, dict[int, Keys]]) -> dict[int, tuple[dict[int, bytes], list[int]]]:
    """Stage 2: each client shares its secrets among its neighbours. Returns the ciphertexts routed to
    each client, and its live neighbours."""
    payloads = {
        c: {
            "task": {**s.base, "secagg-stage": 2},
            "pubkeys": ConfigRecord({str(j): b"".join(pk) for j, pk in keys_for[c].items()}),
        }
        for c in keys_for
    }
    shares = s.parsed(s.replies(2, payloads), 2, _read_shares)
    s.report.bytes_up_keys += sum(len(ct) for out, _ in shares.values() for ct in out.values()) + 32 * len(
        shares
    )
    return s.server.receive_shares(shares)


def _read_input(content: RecordDict) -> tuple[np.ndarray, list[int], dict[str, float]]:
    metrics = {k: float(v) for k, v in content["metrics"].items()}
    if not all(np.isfinite(v) for v in metrics.values()):
        raise ValueError(f"non-finite metrics {metrics}")
    return content["masked"]["y"].numpy(), parse_ints(content["info"]["malformed"]), metrics


def _masked_inputs(
    s: _Stages, routed: dict[int, tuple[dict[int, bytes], list[int]]], code: RingCode | DistributedCode
) -> tuple[list[int], list[int]]:
    """Stage 3: each client trains, encodes and masks its update. Returns (survivors, dropped)."""
    stage3 = {"secagg-stage": 3, **code.to_task()}
    payloads = {
        c: {"task": {**s.base, **stage3, "alive": ints(alive)}, "ciphertexts": bytes_record(cts)}
        for c, (cts, alive) in routed.items()
    }
    read = s.parsed(s.replies(3, payloads), 3, _read_input)
    survivors, dropped = s.server.receive_inputs({c: (y, bad) for c, (y, bad, _) in read.items()})
    s.report.excluded = dict(s.server.excluded)
    s.report.train_metrics = {c: read[c][2] for c in survivors}
    return survivors, dropped


def _confirm(s: _Stages, survivors: list[int]) -> tuple[dict[int, Message], dict[int, bytes]]:
    """Stage 4: every survivor signs the survivor set. Returns the good replies and the valid signatures."""
    r4 = s.replies(
        4, {c: {"task": {**s.base, "secagg-stage": 4, "survivors": ints(survivors)}} for c in survivors}
    )
    signatures = s.server.receive_signatures(
        survivors, s.parsed(r4, 4, lambda content: bytes(content["consistency"]["signature"]))
    )
    s.report.bytes_up_keys += 64 * len(r4)
    return r4, signatures


def _read_reveal(content: RecordDict) -> tuple[dict[int, bytes], dict[int, bytes]]:
    return from_bytes_record(content["b"]), from_bytes_record(content["s"])


def _unmask(
    s: _Stages,
    survivors: list[int],
    dropped: list[int],
    confirmed: dict[int, Message],
    signatures: dict[int, bytes],
) -> np.ndarray:
    """Stage 5: the clients that confirmed reveal the shares that remove every mask. Returns the sum."""
    stage5 = {**s.base, "secagg-stage": 5, "survivors": ints(survivors), "dropped": ints(dropped)}
    payloads = {
        c: {"task": stage5, "signatures": bytes_record(signatures)} for c in confirmed if c in signatures
    }
    replies = s.parsed(s.replies(5, payloads), 5, _read_reveal)
    s.report.bytes_up_keys += sum(len(v) for b, sk in replies.values() for v in (*b.values(), *sk.values()))
    return s.server.unmask(survivors, dropped, replies)


def secure_sum(
    send: Send,
    clients: list[int],
    dim: int,
    code: RingCode | DistributedCode,
    params: SecAggParams,
    tag: bytes,
    seed: int,
    report: SecureSumReport | None = None,
    advertised: Mapping[int, tuple[dict[str, Any], Keys]] | None = None,
    before_unmask: Callable[[list[int]], None] | None = None,
) -> tuple[np.ndarray, list[int], SecureSumReport]:
    """Run the five stages with `clients`; `send({client: records})` delivers one message per client and
    returns the replies by client (an error reply counts as a dropout). Returns (ring sum of the survivors'
    inputs [dim] uint32, survivors, report). Raises SecAggAbort when too few survive a stage; a `report`
    passed in holds what happened so far (who dropped or refused, at which stage, and why).

    `advertised` holds keys clients already advertised for this round ({client: (the stage-1 task it
    answered, its keys)}, see stage1_tasks); stage 1 then goes only to the others, and not at all when
    every client advertised ahead: one message round trip less per round. `before_unmask(survivors)` runs
    once the masked inputs are in, before anything could be unmasked; it raises SecAggAbort to stop there
    (distributed DP: fewer survivors than the budget allows)."""
    report = SecureSumReport() if report is None else report
    report.dropped, report.bytes_up_keys, report.excluded = {}, 0, {}
    n = len(clients)
    t = params.threshold or default_threshold(params.k, n)
    server = SecAggServer(sorted(clients), params.k, t, tag, dim, seed)
    report.k, report.t = min(params.k, n - 1), t
    tasks = stage1_tasks(clients, params, tag, seed)
    ahead = {c: keys for c, (task, keys) in (advertised or {}).items() if c in tasks and task == tasks[c]}
    report.advertised_ahead = len(ahead)
    report.stages = 5 if len(ahead) < len(clients) else 4
    s = _Stages(send, clients, server, {"tag": tag, "k": params.k, "t": t, "seed": seed}, report)
    survivors, dropped = _masked_inputs(s, _share(s, _advertise(s, tasks, ahead)), code)
    if before_unmask is not None:
        before_unmask(survivors)
    # from stage 4 on, a survivor that is gone still counts in the sum: its input is in
    confirmed, signatures = _confirm(s, survivors)
    total = _unmask(s, survivors, dropped, confirmed, signatures)
    report.survivors = survivors
    return total, survivors, report
