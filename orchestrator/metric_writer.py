"""Asynchronous, batched, loss-free metric delivery to a tracking store that may go away for a while.

The learner calls ``add`` (a list append under a lock, microseconds); a
background thread sends batches of up to 1000 metrics (MLflow's ``log_batch``
limit) every ``flush_every_s``. When sending fails the metrics stay queued, the
user is warned once, and the thread retries with backoff; past
``max_buffered`` metrics the oldest are spilled to a JSON-lines file so memory
stays bounded. Spilled metrics are sent once the store is back (or by the next
process that opens the same spill file, e.g. on ``--resume``).

Resending is safe: every metric keeps the timestamp it was created with, and
MLflow drops exact (key, timestamp, step, value) duplicates, so a batch whose
reply was lost is not stored twice.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable

from mlflow.entities import Metric

log = logging.getLogger("metaray")
BATCH = 1000


class MetricWriter:
    def __init__(self, send: Callable[[list[Metric]], None], spill_path: Path, flush_every_s: float = 2.0,
                 max_buffered: int = 100_000):
        self._send = send
        self._spill_path = spill_path
        self._flush_every_s = flush_every_s
        self._max_buffered = max_buffered
        self._queue: deque[Metric] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._failing_since: float | None = None
        self._closed = False  # set when close() stops waiting: the thread then spills instead of retrying
        self.sent = 0
        self.failures = 0
        self._thread = threading.Thread(target=self._run, name="metaray-metrics", daemon=True)
        self._thread.start()

    def add(self, metrics: dict[str, float], step: int, timestamp_ms: int | None = None) -> None:
        ts = timestamp_ms if timestamp_ms is not None else int(time.time() * 1000)
        with self._lock:
            self._queue.extend(Metric(k, float(v), ts, step) for k, v in metrics.items())
            overflow = len(self._queue) - self._max_buffered
            if overflow > 0:
                self._spill([self._queue.popleft() for _ in range(overflow)])

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._queue) + self._spilled_count()

    def close(self, timeout_s: float) -> int:
        """Send everything that is left, waiting up to ``timeout_s`` for the store; return what stays unsent.

        What cannot be sent in time is written to the spill file, which the next writer on it sends first.
        """
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout_s)
        with self._lock:
            self._closed = True
            if self._queue:
                self._spill(list(self._queue))
                self._queue.clear()
            left = self._spilled_count()
        if left:
            log.warning("tracking: %d metrics could not be sent; kept in %s and sent on the next --resume",
                        left, self._spill_path)
        return left

    def _run(self) -> None:
        backoff = 0.5
        while not self._closed:
            self._wake.wait(self._flush_every_s)
            self._wake.clear()
            if self._drain():
                backoff = 0.5
                if self._stop.is_set():
                    return
            else:
                time.sleep(backoff)
                backoff = min(backoff * 2, 10.0)

    def _drain(self) -> bool:
        """Send spilled metrics, then the queue, in batches; False as soon as a send fails."""
        while True:
            batch, from_spill = self._next_batch()
            if not batch:
                return True
            try:
                self._send(batch)
            except Exception as e:  # noqa: BLE001 - any failure of the store means: keep and retry
                self.failures += 1
                if self._failing_since is None:
                    self._failing_since = time.monotonic()
                    log.warning("tracking store unreachable (%s); training continues, metrics are buffered",
                                " ".join(str(e).split())[:160])
                if not from_spill:
                    with self._lock:
                        if self._closed:
                            self._spill(batch)
                        else:
                            self._queue.extendleft(reversed(batch))
                return False
            if from_spill:
                self._drop_spilled(len(batch))
            self.sent += len(batch)
            if self._failing_since is not None:
                log.warning("tracking store reachable again after %.0f s; buffered metrics are being sent",
                            time.monotonic() - self._failing_since)
                self._failing_since = None

    def _next_batch(self) -> tuple[list[Metric], bool]:
        with self._lock:
            spilled = self._read_spill(BATCH)
            if spilled:
                return spilled, True
            n = min(BATCH, len(self._queue))
            return [self._queue.popleft() for _ in range(n)], False

    # Spill file: one JSON object per line; sent from the front, rewritten without the sent lines.
    def _spill(self, metrics: list[Metric]) -> None:
        self._spill_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self._spill_path, "a") as f:
            for m in metrics:
                f.write(json.dumps([m.key, m.value, m.timestamp, m.step]) + "\n")

    def _read_spill(self, n: int) -> list[Metric]:
        if not self._spill_path.exists():
            return []
        with open(self._spill_path) as f:
            lines = [next(f, "") for _ in range(n)]
        return [Metric(*json.loads(line)) for line in lines if line.strip()]

    def _drop_spilled(self, n: int) -> None:
        with self._lock:
            lines = self._spill_path.read_text().splitlines(keepends=True)[n:]
            if lines:
                tmp = self._spill_path.with_suffix(".tmp")
                tmp.write_text("".join(lines))
                tmp.replace(self._spill_path)
            else:
                self._spill_path.unlink()

    def _spilled_count(self) -> int:
        if not self._spill_path.exists():
            return 0
        with open(self._spill_path) as f:
            return sum(1 for line in f if line.strip())
