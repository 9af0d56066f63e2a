"""The thread that owns the model. Idle, it waits for a request and --batch-wait-ms for company; then it
decodes, and between two steps it lets the requests that arrived meanwhile join the running batch (up to
--max-batch rows) after their prefill: continuous batching (fedpeft/serve/running.py). A finished row
leaves at once and frees its place.

Prompt and prefix tuning adapters decode through peft's generate(), one request at a time: their batches are
static (a request that arrives while one decodes waits for it to end).
"""

from __future__ import annotations

import logging
import queue
import threading
import time

from fedpeft.serve.engine import Engine
from fedpeft.serve.jobs import Job, failure

log = logging.getLogger("fedpeft")


class Busy(Exception):
    """More requests wait than the server takes (--max-queue): the client should come back later."""


class Batcher:
    def __init__(self, engine: Engine, max_batch: int, wait_s: float, max_queue: int) -> None:
        self.engine = engine
        self.max_batch = max_batch
        self.wait_s = wait_s
        self.max_queue = max_queue
        self._stopping = False
        # GET /health reports them: the groups of requests prefilled so far, their requests, the most rows at once
        self.batches = 0
        self.rows = 0
        self.largest = 0
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="fedpeft-batcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, jobs: list[Job]) -> None:
        """Queue the jobs of one request, all or none (Busy when the queue is full or the server stops)."""
        if self._stopping or self._queue.qsize() + len(jobs) > self.max_queue:
            raise Busy(f"{self._queue.qsize()} requests are waiting (--max-queue {self.max_queue})")
        for j in jobs:
            self._queue.put(j)

    def stop(self, timeout: float = 15.0) -> None:
        """Finish the batch under way, fail the requests still queued, then end the thread."""
        self._stopping = True
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.fail("the server is stopping")
        self._queue.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _collect(self, first: Job) -> tuple[list[Job], bool]:
        batch, deadline = [first], time.monotonic() + self.wait_s
        while len(batch) < self.max_batch:
            left = deadline - time.monotonic()
            try:
                job = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                return batch, True
            batch.append(job)
        return batch, False

    def _loop(self) -> None:
        if self.engine.continuous:
            self._continuous()
        else:
            self._static()

    def _continuous(self) -> None:
        running = self.engine.running()
        stopping = False
        while not (stopping and not len(running)):
            if not len(running):  # idle: wait for a request, and a moment for company
                first = self._queue.get()
                if first is None:
                    return
                new, stopping = self._collect(first)
            else:  # decoding: whoever arrived since the last step, without waiting
                new, stopping = self._arrived(self.max_batch - len(running), stopping)
            new = [j for j in new if not j.cancelled]
            if new:
                self._count(len(new), len(running) + len(new))
                try:
                    running.join(new)
                except Exception as e:  # the joining requests fail; the running ones go on
                    log.error("the prefill of %d request(s) failed: %s", len(new), e)
                    for j in new:
                        if not j.done:
                            j.fail(failure(e))
            try:
                running.step()
            except Exception as e:  # the running requests fail; the server keeps serving
                log.error("a batch of %d request(s) failed: %s", len(running), e)
                running.fail_all(failure(e))

    def _arrived(self, room: int, stopping: bool) -> tuple[list[Job], bool]:
        new: list[Job] = []
        while len(new) < room and not stopping:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                stopping = True
            else:
                new.append(job)
        return new, stopping

    def _count(self, joined: int, rows: int) -> None:
        self.batches += 1  # joins: a group of requests prefilled together
        self.rows += joined
        self.largest = max(self.largest, rows)

    def _static(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                return
            batch, stopping = self._collect(first)
            batch = [j for j in batch if not j.cancelled]
            if not batch:
                continue
            self._count(len(batch), len(batch))
            try:
                self.engine.run(batch)
            except Exception as e:  # the requests of this batch fail; the server keeps serving
                log.error("a batch of %d request(s) failed: %s", len(batch), e)
                for j in batch:
                    if not j.done:
                        j.fail(failure(e))
