"""Delivery of a tracking folder to its MLflow run: the metric log from its cursor on, then the artifact queue.

One writer at a time per MLflow run: whoever delivers holds an exclusive lock on the folder
(``lock_folder``; the kernel drops it when the holder dies, however it dies). A resumed run takes the
lock before it reads what the store and the log already hold, so a writer of the crashed process can
never send anything after that reading. Sending is idempotent (see ``metric_log``), so a pass that
fails half-way is simply repeated.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path
from typing import Any, Callable

from orchestrator import artifact_queue, metric_log

BATCH = 1000  # MLflow's log_batch limit
MAX_CHUNK = 10 * BATCH  # metrics read from the log per pass at most (bounds the writer's memory)
LOCK = "lock"


class Delivery:
    """Sends what the folder holds. ``send_metrics`` takes (key, value, timestamp_ms, step) tuples and
    ``deliver_artifact`` an outbox entry; both raise when the store does not take them."""

    def __init__(self, folder: Path, send_metrics: Callable[[list[tuple[str, float, int, int]]], None],
                 deliver_artifact: Callable[[Path], None], chunk: int = MAX_CHUNK):
        self.folder = folder
        self.send = send_metrics
        self._deliver_artifact = deliver_artifact
        self._chunk = max(1, min(chunk, MAX_CHUNK))
        self.cursor = metric_log.read_cursor(folder)

    def metrics(self, stop: Callable[[], bool] = lambda: False) -> bool:
        """Send the log from the cursor to its end; True when all of it is in the store."""
        while not stop():
            lines, after = metric_log.read(self.folder, self.cursor, self._chunk)
            if not lines and after == self.cursor:
                return True
            entries = metric_log.to_entries(lines)
            for i in range(0, len(entries), BATCH):
                if stop():
                    return False
                self.send(entries[i : i + BATCH])
            self.cursor = after
            metric_log.write_cursor(self.folder, after)
        return False

    def artifacts(self, stop: Callable[[], bool] = lambda: False) -> bool:
        """Deliver queued artifacts in order; True when none is left."""
        for entry in artifact_queue.ArtifactQueue(self.folder / "outbox").entries():
            if stop():
                return False
            self._deliver_artifact(entry)
        return True


def mlflow_delivery(folder: Path, client: Any, run_id: str, experiment_id: str, chunk: int = MAX_CHUNK) -> Delivery:
    from mlflow.entities import Metric

    def send(entries: list[tuple[str, float, int, int]]) -> None:
        client.log_batch(run_id, metrics=[Metric(k, v, ts, step) for k, v, ts, step in entries])

    return Delivery(folder, send, lambda entry: artifact_queue.deliver(entry, client, run_id, experiment_id), chunk)


def without_http_retries() -> None:
    """Delivery retries with its own backoff; MLflow's default HTTP retries (7, exponential) would stall a
    request to a stopped server for minutes. Set in the environment, so writer processes inherit it."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def finish(work: Delivery, timeout_s: float) -> Exception | None:
    """Deliver everything, retrying with backoff while the store fails, for up to ``timeout_s`` (at least one
    try); None when all is delivered, else the store's last error."""
    deadline = time.monotonic() + timeout_s
    backoff, error = 0.5, None
    while True:
        try:
            if work.metrics() and work.artifacts():
                return None
        except Exception as e:  # noqa: BLE001 - whatever the store says, what is left stays on disk
            error = e
        if time.monotonic() + backoff > deadline:
            return error
        time.sleep(backoff)
        backoff = min(backoff * 2, 10.0)


def lock_folder(folder: Path, timeout_s: float, give_up: Callable[[], bool] = lambda: False) -> int | None:
    """An exclusive lock on ``folder`` (a file descriptor; close it to unlock), or None if another process
    still holds it after ``timeout_s``. The holder's pid is written into the lock file for messages."""
    path = folder / LOCK
    deadline = time.monotonic() + timeout_s
    while True:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if time.monotonic() >= deadline or give_up():
                return None
            time.sleep(0.05)  # the holder is usually a writer finishing its last send, then exiting
            continue
        try:
            current = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:  # not a lock file that its last holder removed with the folder while we waited
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)


def lock_holder(folder: Path) -> str:
    try:
        return (folder / LOCK).read_text().strip() or "?"
    except OSError:
        return "?"
