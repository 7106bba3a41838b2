"""The metric-writer process: delivers a run's metric log and artifact queue to MLflow, and dies with its run.

The learner only appends to the metric log on disk (``metric_log.MetricLog``: a list append per step, a
buffered write every ``HANDOFF_S``, an fsync at each checkpoint) and queues artifacts in the run folder
(``artifact_queue``). A child process reads both and sends them (``delivery.Delivery``) every
``flush_every_s``, retrying with backoff while the store is down; nothing is held only in its memory.
At ``close`` the learner stops the child and sends the rest itself: it is idle by then, and a child that
runs only on idle CPU time may get none on a busy machine.

The child must never outlive its run, nor send anything after the run died that a resumed run would
record again. So: it holds the folder's lock while it lives (a resumed run waits for it); it asks the
kernel for SIGTERM when its parent dies (``PR_SET_PDEATHSIG``) and also checks every half second that
its parent is still its parent; once orphaned it stops sending, lets a send in flight finish, and exits.
A SIGTERM or SIGINT sent to the whole process group (Ctrl-C, ``ray job stop``) is left to the learner,
which then stops the writer itself.

Measured on sine MAML (15 metrics per ~4 ms step): a writer thread in the learner cost ~20% of the step
time (SQLAlchemy holds the GIL), a child at nice 10 still 12-22% (it preempted one of torch's OpenMP
threads, stalling the op at its barrier). So the child runs as SCHED_IDLE, on time the learner leaves.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from orchestrator.errors import DiskFull, one_line
from orchestrator.tracking import delivery, metric_log
from orchestrator.tracking.system_metrics import SystemSampler

log = logging.getLogger("metaray")
SEND_WAIT_S = 20.0  # how long an orphaned writer waits for its send in flight
STOP_WAIT_S = 2.0  # how long close() gives the child to stop by itself before killing it (harmless: see delivery)
PR_SET_PDEATHSIG = 1


class MetricProcess:
    """The learner's handle: ``add`` (microseconds), ``flush`` (durable on disk), ``close`` (deliver the rest)."""

    HANDOFF_S = 0.5

    def __init__(self, uri: str, run_id: str, experiment_id: str, folder: Path, flush_every_s: float,
                 chunk: int = delivery.MAX_CHUNK, system_step: int | None = None):
        delivery.without_http_retries()
        self.folder = folder
        self.last_error: str | None = None  # what the store said last, when something stays undelivered
        self._log = metric_log.MetricLog(folder)
        self._args = (uri, run_id, experiment_id, str(folder), flush_every_s, chunk)
        self._system = SystemSampler.start(system_step) if system_step is not None else None
        self._ctx = multiprocessing.get_context("spawn")  # no fork of a process holding Ray and torch threads
        self._written = time.monotonic()
        self._start()
        atexit.register(self._kill)  # before multiprocessing's own exit hook, which would wait for the child

    def _start(self) -> None:
        self._inbox, self._done = self._ctx.Queue(), self._ctx.Queue()
        self._is_ready = False
        self._proc = self._ctx.Process(target=_serve, name="metaray-metrics", daemon=True,
                                       args=(*self._args, os.getpid(), self._inbox, self._done))
        self._proc.start()

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def add(self, metrics: dict[str, float], step: int, timestamp_ms: int | None = None) -> None:
        self._log.append(step, timestamp_ms if timestamp_ms is not None else int(time.time() * 1000), metrics)
        now = time.monotonic()
        if now - self._written >= self.HANDOFF_S:
            self._write()
            self._written = now

    def _write(self) -> None:
        if self._system is not None:
            for line in self._system.take():
                self._log.append(*line)
        self._log.write()

    def flush(self) -> None:
        """Everything added so far is on disk when this returns (called before each checkpoint)."""
        self._write()
        self._log.sync()
        self._written = time.monotonic()
        if not self._proc.is_alive():
            log.warning("tracking: the metric writer process ended (exit code %s); starting a new one",
                        self._proc.exitcode)
            self._start()

    def wait_ready(self, timeout_s: float = 120.0) -> bool:
        """Block until the child has imported MLflow and taken the folder's lock (a few seconds, once)."""
        return self._ready(timeout_s)

    def _ready(self, timeout_s: float = 0.0) -> bool:
        """Whether the child has said it is ready (it sends nothing before)."""
        deadline = time.monotonic() + timeout_s
        while not self._is_ready:
            try:
                item = self._done.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return False
            if item == "ready":
                self._is_ready = True
            else:
                log.warning("tracking: %s", item[1])
        return True

    def close(self, timeout_s: float) -> int:
        """Stop the child and send what is left from here, retrying up to ``timeout_s`` while the store is
        down; return how many metrics are still not delivered. Counted from the log on disk, so the answer
        holds whatever became of the child."""
        if self._system is not None:
            self._system.stop()
        try:
            self._write()
            self._log.close()
        except DiskFull as e:  # the run already stops for it; what is on disk is still delivered below
            log.warning("tracking: %s", e)
        if self._ready():  # else it has sent nothing yet (it may be starved of CPU): no need to wait for it
            self._inbox.put(("stop",))
        self._kill(STOP_WAIT_S if self._is_ready else 0.0)
        atexit.unregister(self._kill)
        from mlflow import MlflowClient

        uri, run_id, experiment_id, folder, _, chunk = self._args
        lock = delivery.lock_folder(self.folder, delivery.LOCK_WAIT_S)
        if lock is None:
            log.warning("tracking: %s is held by process %s; what is left stays there", folder,
                        delivery.lock_holder(self.folder))
        else:
            try:
                work = delivery.mlflow_delivery(self.folder, MlflowClient(uri), run_id, experiment_id, chunk)
                error = delivery.finish(work, timeout_s)
                if error is not None:
                    self.last_error = one_line(error, 160)
            finally:
                os.close(lock)
        return metric_log.pending_count(self.folder)

    def _kill(self, wait_s: float = 0.0) -> None:
        self._proc.join(wait_s)
        if self._proc.is_alive():
            self._proc.kill()  # what it had not sent is on disk, and sending it again is harmless
            self._proc.join()
        for q in (self._inbox, self._done):
            q.cancel_join_thread()
            q.close()


class _Sender(threading.Thread):
    """The child's delivery loop: a pass every ``flush_every_s``, backoff while the store is down."""

    def __init__(self, work: delivery.Delivery, flush_every_s: float):
        super().__init__(name="metaray-delivery", daemon=True)
        self.work, self.flush_every_s = work, flush_every_s
        self.wake = threading.Event()
        self.stopped = False  # also set from a signal handler: a plain attribute, no lock
        self._failing_since: float | None = None

    def run(self) -> None:
        backoff = 0.5
        while True:
            self.wake.wait(backoff if self._failing_since is not None else self.flush_every_s)
            self.wake.clear()
            if self.stopped:
                return
            ok = self._pass()
            backoff = 0.5 if ok else min(backoff * 2, 10.0)

    def _pass(self) -> bool:
        stop = lambda: self.stopped  # noqa: E731
        try:
            ok = self.work.metrics(stop) and self.work.artifacts(stop)
        except Exception as e:  # noqa: BLE001 - any failure of the store means: keep and retry
            if self._failing_since is None:
                self._failing_since = time.monotonic()
                log.warning("tracking store unreachable (%s); training continues, metrics and artifacts are kept "
                            "in %s and sent when it is back", one_line(e, 160), self.work.folder)
            return False
        if ok and self._failing_since is not None:
            log.warning("tracking store reachable again after %.0f s; what was kept is being sent",
                        time.monotonic() - self._failing_since)
            self._failing_since = None
        return ok

    def stop(self, wait_s: float) -> None:
        """No send starts after this; one in flight may finish (waited for up to ``wait_s``)."""
        self.stopped = True
        self.wake.set()
        self.join(wait_s)


class _ParentWatch:
    """Knows when the parent is gone: a parent-death signal (Linux), and the parent pid as a fallback.

    PR_SET_PDEATHSIG fires when the *thread* that started this process ends, even if its process lives
    on; the handler therefore checks that the parent really changed. A SIGTERM to the whole process group
    while the parent lives is ignored: the parent is stopping gracefully and will close this writer.
    """

    def __init__(self, parent_pid: int):
        self.parent_pid = parent_pid
        self.sender: _Sender | None = None
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, self._on_term)
        if sys.platform.startswith("linux"):
            try:
                ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
            except (OSError, AttributeError):
                pass

    def _on_term(self, signum: int, frame: Any) -> None:
        if self.gone and self.sender is not None:
            self.sender.stopped = True  # no further send starts, from now

    @property
    def gone(self) -> bool:
        return os.getppid() != self.parent_pid


def _serve(uri: str, run_id: str, experiment_id: str, folder: str, flush_every_s: float, chunk: int,
           parent_pid: int, inbox: Any, done: Any) -> None:
    watch = _ParentWatch(parent_pid)
    if watch.gone:  # the parent died before the signal was armed
        os._exit(0)
    _yield_cpu()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    path = Path(folder)
    lock = delivery.lock_folder(path, delivery.LOCK_WAIT_S, give_up=lambda: watch.gone)
    if lock is None:
        if not watch.gone:
            done.put(("error", f"another process (pid {delivery.lock_holder(path)}) is delivering {path}"))
        os._exit(0)
    from mlflow import MlflowClient

    sender = _Sender(delivery.mlflow_delivery(path, MlflowClient(uri), run_id, experiment_id, chunk), flush_every_s)
    watch.sender = sender
    done.put("ready")
    sender.start()
    while not watch.gone:
        try:
            item = inbox.get(timeout=0.5)
        except queue.Empty:
            continue
        if item[0] == "stop":  # the learner sends the rest itself
            break
    sender.stop(SEND_WAIT_S)  # nothing more is sent; the lock goes with this process
    os._exit(0)


def _yield_cpu() -> None:
    """Run only on CPU time the learner leaves idle.

    The learner's torch threads (OpenMP) occupy every core; a writer that preempts one of them stalls the
    whole parallel op at its barrier. SCHED_IDLE (Linux) never preempts them; elsewhere the lowest nice.
    """
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        os.nice(19)
