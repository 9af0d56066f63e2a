"""How the round loop's messages reach the clients (fedpeft.federation.loop): Flower's grid in simulation and
deployment (fedpeft.flower.grid), an in-process one in tests (tests/federation/inprocess.py).

The wire stays Flower's: Message, RecordDict and ConfigRecord are our wire format (fedpeft.federation.wire);
a transport decides only how messages move and how long to wait for their replies.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Protocol, TypeVar

from flwr.app import Message

K = TypeVar("K")

# what the server waits for, by message type, in its progress line (fedpeft.log.Waiting)
WAITING_FOR = {"query": "registering clients", "train": "training", "evaluate": "evaluating"}


class Transport(Protocol):
    """The way to the clients."""

    def node_ids(self) -> list[int]:
        """The nodes connected now (more may connect while the federation waits for --clients)."""
        ...

    def exchange(self, messages: Mapping[K, Message], describe: str) -> dict[K, Message]:
        """Send each message, wait for every reply (a node that died answers with an error reply), and key
        each reply as its message was keyed. `describe`: what the wait is, for its progress line."""
        ...


def describe(messages: Mapping[object, Message]) -> str:
    """`training`, `evaluating`, `registering clients`: the wait for replies to these messages."""
    kinds = sorted({m.metadata.message_type for m in messages.values()})
    return ", ".join(WAITING_FOR.get(k.split(".")[0], k) for k in kinds) or "waiting"


def match_replies(messages: Mapping[K, Message], replies: Iterable[Message]) -> dict[K, Message]:
    """Each reply keyed as the message it answers. Matched by the message, not by the sender: an error reply
    the SuperLink makes for a node that stopped sending heartbeats (a device gone mid-round) comes from the
    SuperLink's own node id. A reply to no message here is dropped."""
    key_of = {m.metadata.message_id: k for k, m in messages.items()}
    answered = [r for r in replies if r.metadata.reply_to_message_id in key_of]
    return {key_of[r.metadata.reply_to_message_id]: r for r in answered}
