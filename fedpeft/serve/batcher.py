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

from fedpeft.serve.engine import Engine, Job

log = logging.getLogger("fedpeft")


class Batcher:
    def __init__(self, engine: Engine, max_batch: int, wait_s: float) -> None:
        self.engine = engine
        self.max_batch = max_batch
        self.wait_s = wait_s
        self.batches = 0  # decoded so far, and the rows they held (GET /health reports them)
        self.rows = 0
        self.largest = 0
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="fedpeft-batcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, jobs: list[Job]) -> None:
        for j in jobs:
            self._queue.put(j)

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the batch under way, then end the thread (requests still queued are dropped)."""
        self._queue.put(None)
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
                        j.fail(f"generation failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
