"""The SuperNode launcher (fedpeft.device.supernode): its poll follows the protocol's rhythm, it finds its
hook point in the installed flwr, and it leaves a SuperNode it does not recognise as Flower made it."""

from __future__ import annotations

import importlib
import importlib.util
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedpeft.device import supernode
from fedpeft.device.supernode import FAST, IDLE_SLEEP, REPLY_SLEEP, Backoff, PollClock


def test_backoff_grows_to_its_cap_and_starts_over() -> None:
    b = Backoff(0.05, 3.0, 1.5)
    delays = [b.next() for _ in range(15)]
    assert delays[0] == 0.05 and delays == sorted(delays) and delays[-1] == 3.0
    b.reset()
    assert b.next() == 0.05


def test_the_poll_is_fast_after_a_reply_and_back_to_flowers_when_idle(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    clock = PollClock()
    for _ in range(40):  # a long idle stretch: Flower's 3 s, never longer
        clock.sleep(IDLE_SLEEP)
    assert slept[0] == FAST and slept[-1] == IDLE_SLEEP and max(slept) == IDLE_SLEEP
    slept.clear()
    for _ in range(3):  # waiting for a reply: short steps, never above Flower's 0.5 s
        clock.sleep(REPLY_SLEEP)
    clock.sleep(IDLE_SLEEP)  # the pull right after the reply went out
    assert all(s < REPLY_SLEEP for s in slept[:3]) and slept[3] == FAST
    clock.sleep(7.0)  # any other sleep is the time module's own
    assert slept[-1] == 7.0 and clock.monotonic() > 0


def test_the_hook_point_is_in_the_installed_flwr() -> None:
    """The flwr that pyproject admits has the point (tests run on it): a version without it fails here."""
    assert supernode.hook_point_found(importlib.import_module(supernode.MODULE))


def test_a_supernode_without_the_hook_point_runs_unchanged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A SuperNode loop that polls some other way (a later flwr, say): the hook must not touch it."""
    source = tmp_path / "stub_start_client_internal.py"
    source.write_text(
        "import time\nfrom functools import partial as pull_objects\n"
        "def start_client_internal():\n    time.sleep(1)\n"
        "def _push_messages():\n    time.sleep(0.5)\n"
    )
    spec = importlib.util.spec_from_file_location("stub_start_client_internal", source)
    stub = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stub)
    before = dict(stub.__dict__)
    with caplog.at_level(logging.WARNING, logger="fedpeft"):
        assert supernode.install(stub) is False
    assert stub.__dict__ == before
    assert len(caplog.records) == 1 and "running it unchanged" in caplog.records[0].getMessage()


def test_the_launcher_takes_flower_supernodes_arguments() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "fedpeft.device.supernode", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and "--isolation" in done.stdout and "--superlink" in done.stdout
