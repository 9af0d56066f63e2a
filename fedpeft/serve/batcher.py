"""The thread that owns the model: it takes the requests that arrived together (up to --max-batch, waiting
--batch-wait-ms for company when it is idle) and decodes them as one batch.

Batches are static: a request that arrives while a batch decodes waits for the next one (no continuous
batching, which would need a paged KV cache).
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
        self.batches = 0  # decoded so far, and the rows they held (GET /health reports them)
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
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                return
            batch, stopping = self._collect(first)
            batch = [j for j in batch if not j.cancelled]
            if not batch:
                continue
            self.batches += 1
            self.rows += len(batch)
            self.largest = max(self.largest, len(batch))
            try:
                self.engine.run(batch)
            except Exception as e:  # the requests of this batch fail; the server keeps serving
                log.error("a batch of %d request(s) failed: %s", len(batch), e)
                for j in batch:
                    if not j.done:
                        j.fail(failure(e))
