"""Delivery of a tracking folder to its MLflow run: the metric log from its cursor on, then the artifact queue.

One writer at a time per MLflow run: whoever delivers holds an exclusive lock on the folder
(``lock_folder``; the kernel drops it when the holder dies, however it dies). A resumed run takes the
lock before it reads what the store and the log already hold, so a writer of the crashed process can
never send anything after that reading. Sending is idempotent (see ``metric_log``), so a pass that
fails half-way is simply repeated.

A store that is down (no connection, a 5xx, a timeout) is waited for; a request the store *refuses* (an
``MlflowException`` whose error code is a 4xx, e.g. INVALID_PARAMETER_VALUE) would be refused again forever.
That item is set aside instead (``<run dir>/tracking/refused/<run id>/``), MLflow's message is said on one
line, and delivery goes on with the rest (``refused``).

Offline, ``deliver`` (``metaray deliver RUN_DIR``) sends what a run left in its folder when the store was down,
and ``register`` registers a run's logged model after the fact. MLflow is imported where it is used: the
learner's side of tracking (``writer.MetricProcess``) never loads it.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from orchestrator.atomic import write_atomic
from orchestrator.errors import one_line
from orchestrator.tracking import artifact_queue, metric_log
from orchestrator.tracking.artifact_queue import ArtifactQueue, register_model
from orchestrator.tracking.store import TrackingError

log = logging.getLogger("metaray")

BATCH = 1000  # MLflow's log_batch limit
MAX_CHUNK = 10 * BATCH  # metrics read from the log per pass at most (bounds the writer's memory)
LOCK = "lock"
FOLDER = "tracking"  # <run dir>/tracking/<MLflow run id>/: the metric log and artifact queue of that run
LOCK_WAIT_S = 30.0  # a writer of a killed run finishes its send in flight (HTTP timeout 10 s), then exits
REFUSED = "refused"  # <run dir>/tracking/refused/<run id>/: what the store refused, kept for the record
# 4xx codes that are not about the request itself: rate limits and a cancelled call pass, a missing login is the
# store being unusable to us (everything would be refused); those are waited for like an outage.
_NOT_REFUSALS = (401, 403, 429, 499)


def refused(error: BaseException) -> bool:
    """Whether the store refused the request itself (it would refuse it again), rather than being unreachable."""
    status = getattr(error, "get_http_status_code", None)
    if status is None:  # not an MlflowException: a connection error, an OS error, ...
        return False
    code = status()
    return 400 <= code < 500 and code not in _NOT_REFUSALS


def refusal(error: BaseException, limit: int = 300) -> str:
    """The store's message on one line, with its error code (a local store's messages do not carry it)."""
    text, code = one_line(error, limit), str(getattr(error, "error_code", ""))
    return text if not code or text.startswith(code) else f"{code}: {text}"


def refused_folder(folder: Path) -> Path:
    """Where the items of tracking folder ``folder`` that the store refused are kept."""
    return folder.parent / REFUSED / folder.name


def set_aside_metrics(folder: Path, entries: list[tuple[str, float, int, int]], error: BaseException) -> None:
    target = refused_folder(folder)
    target.mkdir(parents=True, exist_ok=True)
    with open(target / "metrics.jsonl", "a") as f:
        for entry in entries:
            f.write(json.dumps([*entry, refusal(error, 400)], default=float) + "\n")
    log.warning("tracking: MLflow refused %d metric(s) (%s); set aside in %s", len(entries), refusal(error),
                target / "metrics.jsonl")


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
                self._send(entries[i : i + BATCH])
            self.cursor = after
            metric_log.write_cursor(self.folder, after)
        return False

    def _send(self, batch: list[tuple[str, float, int, int]]) -> None:
        """Send a batch; if the store refuses it, send its metrics one by one and set aside those it refuses."""
        try:
            self.send(batch)
            return
        except Exception as e:  # noqa: BLE001 - an outage propagates (retried later), a refusal is dealt with here
            if not refused(e):
                raise
            if len(batch) == 1:
                set_aside_metrics(self.folder, batch, e)
                return
        for entry in batch:
            self._send([entry])

    def artifacts(self, stop: Callable[[], bool] = lambda: False) -> bool:
        """Deliver queued artifacts in order; True when none is left (an entry the store refuses is set aside)."""
        for entry in artifact_queue.ArtifactQueue(self.folder / "outbox").entries():
            if stop():
                return False
            try:
                self._deliver_artifact(entry)
            except Exception as e:  # noqa: BLE001 - an outage propagates (retried later), a refusal is set aside
                if not refused(e):
                    raise
                target = refused_folder(self.folder)
                target.mkdir(parents=True, exist_ok=True)
                (entry / "refused.txt").write_text(refusal(e, 2000) + "\n")
                kept = target / f"{time.strftime('%Y%m%d-%H%M%S')}-{entry.name}"  # a resumed run counts anew
                os.replace(entry, kept)
                log.warning("tracking: MLflow refused %s (%s); set aside in %s", artifact_queue.describe(kept),
                            refusal(e), kept)
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


def deliver(run_dir: str | Path, out=None) -> int:
    """Send to MLflow what the runs of ``run_dir`` left undelivered (``metaray deliver``), and end those runs
    with the status they stopped with. Returns how many metrics and artifacts are still undelivered."""
    if not Path(run_dir).is_dir():
        raise TrackingError(f"{run_dir}: no such run folder")
    from mlflow import MlflowClient

    without_http_retries()
    left = 0
    folders = sorted(p for p in (Path(run_dir) / FOLDER).glob("*") if (p / "store.json").exists())
    if not folders:
        print(f"{run_dir}: nothing to deliver", file=out)
    for folder in folders:
        meta = read_meta(folder)
        lock = lock_folder(folder, LOCK_WAIT_S)
        if lock is None:
            raise TrackingError(f"{folder} is being delivered by process {lock_holder(folder)} (a run still going?)")
        try:
            client = MlflowClient(meta["uri"])
            error = finish(mlflow_delivery(folder, client, meta["run_id"], meta["experiment_id"]), 0)
            if error is None and meta.get("status"):
                try:
                    client.set_terminated(meta["run_id"], meta["status"])
                except Exception as e:  # noqa: BLE001
                    error = e
            if error is not None:  # the store is still down: say so and keep everything
                n = metric_log.pending_count(folder) + len(ArtifactQueue(folder / "outbox").entries())
                print(f"MLflow run {meta['run_id']}: {n} metrics and artifacts still undelivered "
                      f"({one_line(error, 160)}); try again when {meta['uri']} is reachable", file=out)
                left += max(n, 1)
                continue
        finally:
            os.close(lock)
        remove_folder(folder)
        print(f"MLflow run {meta['run_id']}: everything delivered", file=out)
    return left


def register(uri: str, run_id: str, name: str) -> str:
    """Register the latest LoggedModel of run ``run_id`` as a new version of ``name`` (e.g. for a CLI
    ``--register`` after the fact); returns the version. New runs register through ``tracking.registered_model``."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    run = client.get_run(run_id)
    models = client.search_logged_models(experiment_ids=[run.info.experiment_id],
                                         filter_string=f"source_run_id = '{run_id}'")
    if not models:
        raise TrackingError(f"MLflow run {run_id} has no logged model to register")
    latest = max(models, key=lambda m: m.creation_timestamp)
    return register_model(client, latest.model_id, name, run_id)


def unfinished_run(run_dir: Path) -> dict[str, Any] | None:
    """The tracker state (``{"run_id": ...}``) of the MLflow run a process began in ``run_dir`` and never closed
    (it was killed), or None. A closed run's folder is gone, or records the status it ended with."""
    metas = [read_meta(p.parent) for p in sorted((Path(run_dir) / FOLDER).glob("*/store.json"))]
    begun = [m for m in metas if "status" not in m]
    return {"run_id": begun[-1]["run_id"]} if begun else None


def write_meta(folder: Path, meta: dict[str, Any]) -> None:
    write_atomic(folder / "store.json", json.dumps(meta))


def read_meta(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "store.json").read_text())


def remove_folder(folder: Path) -> None:
    """Delete a delivered tracking folder (and ``tracking/`` once empty), unless someone holds its lock."""
    lock = lock_folder(folder, 0)
    if lock is None:
        return
    try:
        shutil.rmtree(folder, ignore_errors=True)
    finally:
        os.close(lock)
    try:
        folder.parent.rmdir()
    except OSError:
        pass
