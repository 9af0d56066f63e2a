"""`python -m fedpeft.device.supernode ARGS`: Flower's SuperNode (the same arguments as `flower-supernode`),
polling its SuperLink at the protocol's rhythm instead of every 3 s.

flwr 1.42's SuperNode loop (`flwr/supernode/start_client_internal.py`, `start_client_internal`) sleeps 3 s
after every pull that finds no message, and `_push_messages` waits for the ClientApp's reply in 0.5 s steps;
no flag or environment variable sets either. The empty pull comes right after every reply, because the
server has not made the next stage's message yet, so each stage of a secure round waited up to 3 s for
nothing (benchmarks/README.md, "Deployment"). Flower's SuperExec has a setting for its own poll
(`FLWR_SUPEREXEC_TASK_POLL_INTERVAL`); this is the same idea for the SuperNode's.

The hook is one point of flwr's code: the names that module imported (its globals). Two of them change:
- `time` gets a stand-in whose sleep() turns sleep(3), nothing to pull, into a back-off: FAST right after a
  reply went out, growing by FACTOR per empty pull up to Flower's 3 s when the federation is idle (the
  SuperLink then sees what it sees today); and sleep(0.5), waiting for the reply (or an object of it), into
  the same kind of back-off from REPLY_FAST, capped at Flower's 0.5 s. Everything else is the time module.
- `pull_objects` pulls a message's objects with a short first retry: the ServerApp pushes a message before
  its objects, one by one, so a fast poll finds the message while they are still arriving, and Flower's
  default first retry is 1 s, doubling (PULL_INITIAL_BACKOFF, flwr/supercore/constant.py).
At start the launcher checks that the point is as described (the module, its `time`, the two sleeps in
the two functions' source, `pull_objects` taking the back-off arguments); if not, it runs Flower's SuperNode
unchanged and says so in one log line.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import inspect
import logging
import sys
import time
from types import ModuleType
from typing import Any

log = logging.getLogger("fedpeft")

MODULE = "flwr.supernode.start_client_internal"
IDLE_SLEEP, REPLY_SLEEP = 3.0, 0.5  # what flwr sleeps; the hook recognises its calls by these values
FAST, REPLY_FAST, FACTOR = 0.05, 0.01, 1.3
# a pull-and-push cycle that took this long between two empty pulls handled a message: poll fast again
BUSY_GAP = 0.5
# an object the SuperLink does not have yet is asked for again after this, doubling up to OBJECT_RETRY_CAP
OBJECT_RETRY, OBJECT_RETRY_CAP = 0.02, 0.5


class Backoff:
    """Delays from `fast`, growing by `factor` per wait, up to `slow`; reset() starts over."""

    def __init__(self, fast: float, slow: float, factor: float = FACTOR) -> None:
        self.fast, self.slow, self.factor = fast, slow, factor
        self.delay = fast

    def reset(self) -> None:
        self.delay = self.fast

    def next(self) -> float:
        delay, self.delay = self.delay, min(self.slow, self.delay * self.factor)
        return delay


class PollClock:
    """Stands in for the `time` module inside Flower's SuperNode loop (see the module's docstring)."""

    def __init__(self) -> None:
        self.pull = Backoff(FAST, IDLE_SLEEP)
        self.reply = Backoff(REPLY_FAST, REPLY_SLEEP)
        self.last_idle = time.monotonic()

    def sleep(self, seconds: float) -> None:
        if seconds == IDLE_SLEEP:
            if time.monotonic() - self.last_idle > BUSY_GAP:  # a message was handled since the last one
                self.pull.reset()
            self.reply.reset()
            time.sleep(self.pull.next())
            self.last_idle = time.monotonic()
        elif seconds == REPLY_SLEEP:
            self.pull.reset()  # a reply is on its way: the next stage's message will follow it
            time.sleep(self.reply.next())
        else:
            time.sleep(seconds)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def hook_point_found(module: ModuleType) -> bool:
    """Whether `module` is the SuperNode loop this hook was written for (flwr 1.42)."""
    try:
        loop = inspect.getsource(module.start_client_internal)
        push = inspect.getsource(module._push_messages)
        pull = inspect.signature(module.pull_objects).parameters
    except (AttributeError, OSError, TypeError, ValueError):
        return False
    return (
        getattr(module, "time", None) is time
        and "time.sleep(3)" in loop
        and "time.sleep(0.5)" in push
        and {"initial_backoff", "backoff_cap"} <= set(pull)
    )


def install(module: ModuleType) -> bool:
    """Give `module` the PollClock; False (and one log line) where its code is not what the hook expects."""
    if not hook_point_found(module):
        version = importlib.metadata.version("flwr")
        log.warning(
            "the SuperNode's poll in flwr %s is not the one this launcher knows; running it "
            "unchanged (it waits up to 3 s for each message)",
            version,
        )
        return False
    module.time = PollClock()  # type: ignore[attr-defined]
    module.pull_objects = functools.partial(
        module.pull_objects, initial_backoff=OBJECT_RETRY, backoff_cap=OBJECT_RETRY_CAP
    )
    return True


def main(argv: list[str]) -> None:
    from fedpeft.log import setup_console

    setup_console()
    install(importlib.import_module(MODULE))
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *argv]
    flower_supernode()


if __name__ == "__main__":
    main(sys.argv[1:])
