"""The round loop's transport over Flower's Grid (fedpeft.federation.transport): push, then pull with a short
poll, in simulation (Flower's engine) and deployment (a SuperLink) alike."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import TypeVar

from flwr.app import Message
from flwr.serverapp import Grid

from fedpeft.federation.transport import match_replies
from fedpeft.log import Waiting

K = TypeVar("K")

# Grid.send_and_receive sleeps 3 s between pulls (flwr 1.42), longer than most stages. A fixed 0.1 s poll
# keeps a local SuperLink busy answering 10 pulls a second all through a stage's training
# (benchmarks/README.md, "Deployment"); backing off to 1 s costs at most a second per stage and keeps quick
# stages quick.
POLL_SECONDS, POLL_MAX_SECONDS = 0.1, 1.0


def send_and_receive(
    grid: Grid, messages: list[Message], progress: Callable[[int], None] | None = None
) -> list[Message]:
    """Grid.send_and_receive with a short poll: push, then pull until every message has its reply (the
    SuperLink answers for a node that died with an error reply, so this ends). `progress(n)` hears of
    each batch of n replies."""
    waiting = set(grid.push_messages(messages))
    replies: list[Message] = []
    delay = POLL_SECONDS
    while waiting:
        got = list(grid.pull_messages(waiting))
        replies += got
        if progress is not None:  # every poll, replies or not: a long silence still gets its line
            progress(len(got))
        waiting -= {m.metadata.reply_to_message_id for m in got}
        if waiting:
            # never a busy loop: each pull checks every waiting id, and with 10,000 virtual clients a pull
            # after every single reply kept a core busy beside the client actor on a 2-core machine
            delay = POLL_SECONDS if got else min(delay * 1.5, POLL_MAX_SECONDS)
            time.sleep(delay)
    return replies


class GridTransport:
    """Flower's Grid as the federation's transport. `progress` (--progress): a long wait for replies shows
    how many came (fedpeft.log.Waiting)."""

    def __init__(self, grid: Grid, progress: bool = True) -> None:
        self.grid, self.progress = grid, progress

    def node_ids(self) -> list[int]:
        return list(self.grid.get_node_ids())

    def exchange(self, messages: Mapping[K, Message], describe: str) -> dict[K, Message]:
        with Waiting(describe, len(messages), "replies", enabled=self.progress) as wait:
            replies = send_and_receive(self.grid, list(messages.values()), wait.update)
        return match_replies(messages, replies)
