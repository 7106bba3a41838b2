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

import itertools
import json
import logging
import multiprocessing
import os
import queue
import signal
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable

from mlflow.entities import Metric

from orchestrator.atomic import write_atomic
from orchestrator.errors import one_line

log = logging.getLogger("metaray")
BATCH = 1000
SPILL_CHUNK = 50 * BATCH


class MetricWriter:
    def __init__(self, send: Callable[[list[Metric]], None], spill_path: Path, flush_every_s: float = 2.0,
                 max_buffered: int = 100_000):
        self._send = send
        self._spill_path = spill_path
        self._flush_every_s = flush_every_s
        self._max_buffered = max_buffered
        self._queue: deque[Metric] = deque()
        self._inflight: list[Metric] = []  # taken from the queue, being sent
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._failing_since: float | None = None
        self._closed = False  # set when close() stops waiting: the thread then spills instead of retrying
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
        """Metrics not yet confirmed sent: queued, in flight, or in the spill file."""
        with self._lock:
            return len(self._queue) + len(self._inflight) + self._spilled_count()

    def close(self, timeout_s: float) -> int:
        """Send everything that is left, waiting up to ``timeout_s`` for the store; return what stays unsent.

        What cannot be sent in time is written to the spill file, which the next writer on it sends first.
        A batch still in flight is spilled too: if its send does land later, MLflow drops the duplicates.
        """
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout_s)
        with self._lock:
            self._closed = True
            left = [*self._inflight, *self._queue]
            self._queue.clear()
            if left:
                self._spill(left)
            unsent = self._spilled_count()
        if unsent:
            log.warning("tracking: %d metrics could not be sent; kept in %s and sent on the next --resume",
                        unsent, self._spill_path)
        return unsent

    def _run(self) -> None:
        backoff = 0.5
        while not self._closed:
            self._wake.wait(self._flush_every_s)
            self._wake.clear()
            try:
                ok = self._drain()
            except Exception as e:  # noqa: BLE001 - a bug or a broken disk must not end delivery silently
                log.warning("tracking: metric delivery error (%s); retrying", one_line(e, 160))
                ok = False
            if ok and self._stop.is_set():
                return
            if not ok:
                time.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
            else:
                backoff = 0.5

    def _drain(self) -> bool:
        """Send spilled metrics, then the queue, in batches; False as soon as a send fails."""
        while not self._closed:
            with self._lock:
                spilled, lines = self._read_spill(SPILL_CHUNK)
            if lines:
                # A whole chunk is sent before the file is rewritten, once: rewriting after every batch made
                # draining a large spill quadratic. Resending part of a chunk after a failure is harmless.
                for i in range(0, len(spilled), BATCH):
                    if not self._try_send(spilled[i : i + BATCH]):
                        return False
                with self._lock:
                    self._drop_spilled(lines)
                continue
            with self._lock:
                self._inflight = [self._queue.popleft() for _ in range(min(BATCH, len(self._queue)))]
                batch = list(self._inflight)
            if not batch:
                return True
            sent = self._try_send(batch)
            with self._lock:
                if not sent:
                    self._queue.extendleft(reversed(self._inflight))
                self._inflight = []
            if not sent:
                return False
        return False

    def _try_send(self, batch: list[Metric]) -> bool:
        try:
            self._send(batch)
        except Exception as e:  # noqa: BLE001 - any failure of the store means: keep and retry
            if self._failing_since is None:
                self._failing_since = time.monotonic()
                log.warning("tracking store unreachable (%s); training continues, metrics are buffered",
                            one_line(e, 160))
            return False
        if self._failing_since is not None:
            log.warning("tracking store reachable again after %.0f s; buffered metrics are being sent",
                        time.monotonic() - self._failing_since)
            self._failing_since = None
        return True

    # Spill file: one JSON array per line; sent from the front, rewritten without the sent lines.
    def _spill(self, metrics: list[Metric]) -> None:
        try:
            self._spill_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self._spill_path, "a") as f:
                f.write("".join(json.dumps([m.key, m.value, m.timestamp, m.step]) + "\n" for m in metrics))
        except OSError as e:  # a full disk: memory stays bounded, so these metrics are lost; say so
            log.warning("tracking: could not spill %d metrics to %s (%s); they are lost", len(metrics),
                        self._spill_path, e)

    def _read_spill(self, n: int) -> tuple[list[Metric], int]:
        """Up to ``n`` lines from the front of the spill file: the metrics on them, and how many lines."""
        if not self._spill_path.exists():
            return [], 0
        with open(self._spill_path) as f:
            lines = list(itertools.islice(f, n))
        out = []
        for line in lines:
            try:
                out.append(Metric(*json.loads(line)))
            except (ValueError, TypeError):
                if line.strip():  # a line cut short by a crash mid-write: skip it, keep the rest
                    log.warning("tracking: skipping a damaged line in %s", self._spill_path)
        return out, len(lines)

    def _drop_spilled(self, n: int) -> None:
        lines = self._spill_path.read_text().splitlines(keepends=True)[n:]
        if lines:
            write_atomic(self._spill_path, "".join(lines))
        else:
            self._spill_path.unlink()

    def _spilled_count(self) -> int:
        if not self._spill_path.exists():
            return 0
        with open(self._spill_path) as f:
            return sum(1 for line in f if line.strip())


class MetricProcess:
    """A ``MetricWriter`` in a child process that runs only on CPU time the learner leaves idle.

    Measured on sine MAML (the fastest workload, 15 metrics per ~4 ms step): the same writer on a thread
    cost the learner ~20% of its step time (SQLAlchemy's per-metric work holds the GIL), and a child at
    nice 10 still cost 12-22% because it preempted one of torch's OpenMP threads and stalled the op at
    its barrier. So the child runs as SCHED_IDLE, and the learner hands it steps in batches (every
    ``HANDOFF_S``, and at ``flush``) instead of one pipe write per step. Where the learner keeps every
    core busy, metrics reach the store in its idle moments and at ``close``. ``close`` waits for the
    child to send what is left and returns how many metrics stayed unsent (they are in the spill file).
    """

    HANDOFF_S = 0.5

    def __init__(self, uri: str, run_id: str, spill_path: Path, flush_every_s: float, max_buffered: int):
        ctx = multiprocessing.get_context("spawn")  # no fork of a process holding Ray and torch threads
        self._queue = ctx.Queue()
        self._done = ctx.Queue()
        self._proc = ctx.Process(target=_serve, name="metaray-metrics", daemon=True,
                                 args=(uri, run_id, str(spill_path), flush_every_s, max_buffered, self._queue,
                                       self._done))
        self._proc.start()
        self._pending: list[tuple[dict[str, float], int, int]] = []
        self._handed_off = time.monotonic()

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def add(self, metrics: dict[str, float], step: int) -> None:
        self._pending.append((metrics, step, int(time.time() * 1000)))
        if time.monotonic() - self._handed_off >= self.HANDOFF_S:
            self.flush()

    def flush(self) -> None:
        """Hand every step added so far to the child (called at checkpoints, so a crash cannot lose them)."""
        if self._pending:
            self._queue.put(("steps", self._pending))
            self._pending = []
        self._handed_off = time.monotonic()

    def wait_ready(self, timeout_s: float = 120.0) -> bool:
        """Block until the child has imported MLflow and connected (a one-off cost of a few seconds)."""
        try:
            return self._done.get(timeout=timeout_s) == "ready"
        except queue.Empty:
            return False

    def close(self, timeout_s: float) -> int:
        """Tell the child to finish; return how many metrics stayed unsent (0 if it died: unknown, warned)."""
        self.flush()
        self._queue.put(("close", timeout_s))
        deadline = time.monotonic() + timeout_s + 60
        left: Any = "ready"
        while left == "ready" and time.monotonic() < deadline:  # skip a start-up signal nobody waited for
            try:
                left = self._done.get(timeout=1.0)
            except queue.Empty:
                if not self._proc.is_alive():
                    break
        if not isinstance(left, int):
            log.warning("tracking: the metric writer process ended early; recent metrics may be missing")
            left = 0
        self._proc.join(5)
        if self._proc.is_alive():
            self._proc.kill()
        return left


def _serve(uri: str, run_id: str, spill_path: str, flush_every_s: float, max_buffered: int,
           inbox: Any, done: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the learner, which then closes us cleanly
    _yield_cpu()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    writer = MetricWriter(lambda ms: client.log_batch(run_id, metrics=ms), Path(spill_path), flush_every_s,
                          max_buffered)
    done.put("ready")
    while True:
        item = inbox.get()
        if item[0] == "close":
            done.put(writer.close(item[1]))
            return
        for metrics, step, timestamp_ms in item[1]:
            writer.add(metrics, step, timestamp_ms)


def _yield_cpu() -> None:
    """Run only on CPU time the learner leaves idle.

    The learner's torch threads (OpenMP) occupy every core; a writer that preempts one of them stalls the
    whole parallel op at its barrier. SCHED_IDLE (Linux) never preempts them; elsewhere the lowest nice.
    """
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        os.nice(19)
