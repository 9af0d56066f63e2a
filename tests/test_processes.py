"""Memory as a device feels it (fedpeft.processes): the PSS of a process tree beside its summed RSS."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from fedpeft.device import tasks
from fedpeft.processes import PeakPss, peak_rss, pss, tree_peak_rss, tree_pss

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/smaps_rollup"), reason="needs Linux /proc")

HOLD = "import sys, time; b = bytearray(int(sys.argv[1]) << 20); b[::4096] = b'x' * len(b[::4096]); time.sleep(30)"


def _children(mib: list[int]) -> list[subprocess.Popen]:
    procs = [subprocess.Popen([sys.executable, "-c", HOLD, str(m)]) for m in mib]
    time.sleep(1.5)  # each has touched its pages
    return procs


def test_a_trees_pss_counts_shared_pages_once_and_its_private_pages_in_full() -> None:
    procs = _children([64, 64])
    try:
        rss_sum, tree = tree_peak_rss(), tree_pss()
        # two interpreters share their libraries with this one: the sum of RSS counts them three times
        assert tree < rss_sum
        for p in procs:  # each child's 64 MiB are its own: its PSS holds them whole
            assert 64 * 2**20 <= pss(p.pid) <= peak_rss(p.pid)
        assert tree >= pss() + 128 * 2**20
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_the_sampled_peak_keeps_what_a_child_held_after_it_is_gone() -> None:
    sampler = PeakPss(os.getpid(), every=0.1)
    with sampler.active():
        (proc,) = _children([96])
        proc.kill()
        proc.wait()
    assert sampler.peak >= pss() + 96 * 2**20 > tree_pss()


def test_max_memory_is_the_whole_devices_and_the_worker_gets_what_the_rest_leaves(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Here this test process stands for `fedpeft client` and a child holding 64 MiB for its SuperNode: the
    child's PSS comes off the device's budget."""
    (other,) = _children([64])
    try:
        monkeypatch.setitem(tasks.STATS, "root_pid", os.getpid())
        monkeypatch.setitem(tasks.STATS, "budget_logged", None)
        left = tasks.training_budget(2000.0)
        held = (tree_pss() - pss()) / 2**20  # the "SuperNode" (and this test's own share of nothing else)
        assert 2000 - left >= 64 and abs((2000 - left) - held) < 16
        monkeypatch.setitem(tasks.STATS, "root_pid", 0)  # no device tree (simulation): nothing comes off
        assert tasks.training_budget(2000.0) == 2000.0
    finally:
        other.kill()
        other.wait()
