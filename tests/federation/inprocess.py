"""An in-process transport for the round loop (fedpeft.federation.transport): each message goes straight to
our ClientApp's handler, in this process, with a Context per node as Flower's simulation makes one. No Ray,
no SuperLink: the federation's own logic, end to end, in a test's time.

It lives with the tests, not in fedpeft/federation/: it runs the clients' torch work in the server's process,
which only a test wants (users have `fedpeft simulate` and deployed devices), and the library's round loop
stays free of the client side.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar
from uuid import uuid4

from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedpeft.federation.transport import match_replies
from fedpeft.flower import client_app

K = TypeVar("K")


class InProcessTransport:
    """Nodes 1..n, each our ClientApp with its own Context (`node_configs[node]`, by default a simulated
    node's: its partition of the run's data). Keeps every message and reply it carried in `sent`."""

    def __init__(self, node_configs: Mapping[int, Mapping[str, Any]]) -> None:
        # as Flower's engines set it: a Message is made only inside a task of a run
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
        self.contexts = {
            node: Context(run_id=1, node_id=node, node_config=dict(nc), state=RecordDict(), run_config={})
            for node, nc in node_configs.items()
        }
        self.sent: list[tuple[Message, Message]] = []
        self.waits: list[str] = []  # each exchange's description, in order

    @classmethod
    def simulation(cls, n: int) -> InProcessTransport:
        """n simulated nodes, as `fedpeft simulate` runs them: partition i of n for node i + 1."""
        return cls({i + 1: {"partition-id": i, "num-partitions": n} for i in range(n)})

    def node_ids(self) -> list[int]:
        return list(self.contexts)

    def exchange(self, messages: Mapping[K, Message], describe: str) -> dict[K, Message]:
        handlers = {"query": client_app.describe, "train": client_app.train, "evaluate": client_app.evaluate}
        self.waits.append(describe)
        replies = []
        for m in messages.values():
            m.metadata.__dict__["_message_id"] = str(uuid4())  # as a Grid's push does (flwr's InMemoryGrid)
            reply = handlers[m.metadata.message_type](m, self.contexts[m.metadata.dst_node_id])
            self.sent.append((m, reply))
            replies.append(reply)
        return match_replies(messages, replies)
