"""Flower's Ray backend with actors that train several virtual clients in lockstep (fedpeft.training.lockstep).

Flower's backend hands each message to an idle actor, one message per actor at a time. This one lets
`clients-per-actor` (K) messages per actor in at once: the training messages (a plain round's, or secure
stage 3's) that arrive together are gathered, up to K, and sent to one actor as a group; the actor trains
their clients in lockstep (fedpeft.device.tasks.prefit), then passes each message through the ClientApp as
usual, which finds its training done and goes on as always: DP clipping, secure aggregation's masking and its
own noise, metrics, each client's reply and context its own. Every other message goes to an actor alone.

The hook: Flower 1.42's `start_vce` imports `RayBackend` from `flwr.server.superlink.fleet.vce.backend.
raybackend` when the simulation starts (vce_api.py, `backend_fn`); `install(K)` puts this subclass there,
in the driver process only.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import ray
from flwr.app import Context, Message
from flwr.server.superlink.fleet.vce.backend import raybackend
from flwr.simulation.ray_transport.ray_actor import BasicActorPool, ClientAppFn, VirtualClientEngineActor

log = logging.getLogger("fedpeft")
GATHER_S = 0.3  # how long the first training message of a group waits for company (Flower queues a round's
# messages every 0.1 s: vce_api.add_messages_to_queue)


def trains(message: Message) -> bool:
    """A message whose task trains the client: a plain round's, or secure aggregation's stage 3."""
    if message.metadata.message_type != "train" or "task" not in message.content.config_records:
        return False
    stage = message.content["task"].get("secagg-stage")
    return stage is None or int(stage) == 3


@ray.remote
class GroupActor(VirtualClientEngineActor):
    """Flower's ClientAppActor, with `run_group` for K training messages at once."""

    def run_group(
        self, app_fn: ClientAppFn, messages: list[Message], cids: list[str], contexts: list[Context]
    ) -> list[Any]:
        from fedpeft.device import tasks  # torch: in the actor only

        try:
            tasks.prefit(
                [
                    (m.content, int(c.node_config["partition-id"]))
                    for m, c in zip(messages, contexts, strict=True)
                ]
            )
        except Exception as e:  # each message then trains on its own, and fails (or not) as it would alone
            log.error(
                "lockstep training failed (%s: %s); the clients train one after another", type(e).__name__, e
            )
            tasks.PREFIT.clear()
        out: list[Any] = []
        for message, cid, context in zip(messages, cids, contexts, strict=True):
            try:
                out.append(self.run(app_fn, message, cid, context))
            except Exception as e:  # this message's failure, reported for it alone
                out.append(e)
        tasks.PREFIT.clear()
        return out


class _Pending:
    def __init__(self, message: Message, context: Context) -> None:
        self.message, self.context = message, context
        self.arrived = time.monotonic()
        self.taken = False  # into a group
        self.done = threading.Event()
        self.result: Any = None


class LockstepBackend(raybackend.RayBackend):
    clients_per_actor = 1

    def build(self, app_fn: ClientAppFn) -> None:
        self.pool = BasicActorPool(
            actor_type=GroupActor, client_resources=self.client_resources, actor_kwargs=self.actor_kwargs
        )
        self.pool.add_actors_to_pool(self.pool.actors_capacity)
        self.app_fn = app_fn
        self._actors = threading.Semaphore(self.pool.num_actors)  # Flower's pool is not thread-safe
        self._pool_lock = threading.Lock()
        self._line = threading.Condition()
        self._waiting: list[_Pending] = []
        log.debug(
            "lockstep backend: %d actors, %d clients each", self.pool.num_actors, self.clients_per_actor
        )

    @property
    def num_workers(self) -> int:
        return super().num_workers * self.clients_per_actor

    def process_message(self, message: Message, context: Context) -> tuple[Message, Context]:
        if not trains(message):
            return _unpack(self._call(lambda a: a.run.remote(self.app_fn, message, _cid(context), context)))
        pending = _Pending(message, context)
        group = self._join(pending)
        if group:  # the first in line sends the group it heads
            self._send(group)
        pending.done.wait()
        return _unpack(pending.result)

    def _join(self, pending: _Pending) -> list[_Pending]:
        """Wait in line until another message's group takes this one (returns []), or until this one heads
        the line and K messages wait or GATHER_S has passed since it came (returns the group it heads)."""
        k = self.clients_per_actor
        with self._line:
            self._waiting.append(pending)
            self._line.notify_all()
            while not pending.taken:
                left = pending.arrived + GATHER_S - time.monotonic()
                if self._waiting[0] is pending and (len(self._waiting) >= k or left <= 0):
                    group, self._waiting = self._waiting[:k], self._waiting[k:]
                    for p in group:
                        p.taken = True
                    self._line.notify_all()
                    return group
                self._line.wait(timeout=max(left, 0.005))
        return []

    def _send(self, group: list[_Pending]) -> None:
        # in partition order: the stack's row order changes float rounding, and a resumed run must repeat it
        group = sorted(group, key=lambda p: int(_cid(p.context)))
        messages, contexts = [p.message for p in group], [p.context for p in group]
        cids = [_cid(c) for c in contexts]
        try:
            results = self._call(lambda a: a.run_group.remote(self.app_fn, messages, cids, contexts))
            if not isinstance(results, list) or len(results) != len(group):
                raise RuntimeError(f"the actor answered a group of {len(group)} with {results!r:.80}")
        except Exception as e:  # the actor died: every message of the group fails with it
            results = [e] * len(group)
        for p, r in zip(group, results, strict=True):
            p.result = r
            p.done.set()

    def _call(self, submit: Any) -> Any:
        with self._actors:
            with self._pool_lock:
                actor = self.pool.pool.pop()
            try:
                return ray.get(submit(actor))
            finally:
                with self._pool_lock:
                    self.pool.pool.append(actor)


def _cid(context: Context) -> str:
    return str(context.node_config["partition-id"])


def _unpack(result: Any) -> tuple[Message, Context]:
    if isinstance(result, Exception):
        raise result
    _, message, context = result
    return message, context


def install(clients_per_actor: int) -> None:
    """Make Flower's simulation use LockstepBackend with K clients per actor (in this process)."""
    if clients_per_actor <= 1:
        return
    LockstepBackend.clients_per_actor = clients_per_actor
    raybackend.RayBackend = LockstepBackend
