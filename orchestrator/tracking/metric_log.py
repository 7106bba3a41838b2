"""The run's metric log on disk: every metric is appended here by the learner before anything sends it.

A tracking folder (``<run dir>/tracking/<MLflow run id>/``) holds segments ``wal-000001.jsonl``, ...,
one line per ``log_metrics`` call: ``[step, timestamp_ms, {key: value}]``, and ``cursor.json``, how far
the writer process has delivered them to the store. The learner appends in batches (a buffered write
every ``HANDOFF_S``, no waiting on anyone) and fsyncs at each checkpoint (``MetricLog.sync``), so at a
checkpoint every metric up to that step is on disk whatever happens to the store or to the writer.
The writer process reads from the cursor (``read``), sends, then moves the cursor. A crash can leave
lines sent but the cursor not moved; sending them again is harmless, because MLflow drops exact
duplicates (same key, timestamp, step and value) and a line keeps its timestamp forever.

A process never appends to a segment it did not create (a crash may have cut the last line of the old
one), and a segment is complete once a newer one exists; the writer deletes segments it has delivered.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from orchestrator.errors import raise_if_full

log = logging.getLogger("metaray")
SEGMENT_BYTES = 16 * 2**20
# One encoder for every line (json.dumps with an argument makes a new one per call). default=float takes
# numpy float32 values; floats round-trip exactly, NaN and inf included.
_encode = json.JSONEncoder(default=float).encode
Line = tuple[int, int, dict[str, float]]  # step, timestamp_ms, metrics


def segments(folder: Path) -> list[Path]:
    return sorted(folder.glob("wal-*.jsonl"))


def _number(path: Path) -> int:
    return int(path.stem[4:])


class MetricLog:
    """The learner's end: ``append`` (a list append), ``write`` (to the OS), ``sync`` (to the disk)."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        existing = segments(folder)
        self._n = _number(existing[-1]) if existing else 0
        self._fd = -1
        self._open_next()
        self._pending: list[Line] = []

    def _open_next(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        self._n += 1
        self._fd = os.open(self._path(), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._size = 0

    def append(self, step: int, timestamp_ms: int, metrics: dict[str, float]) -> None:
        self._pending.append((step, timestamp_ms, metrics))

    def write(self) -> None:
        """Hand the appended lines to the OS (a crash of this process no longer loses them)."""
        if not self._pending:
            return
        data = "".join([_encode(line) + "\n" for line in self._pending]).encode()
        self._pending = []
        try:
            if self._size and self._size + len(data) > SEGMENT_BYTES:
                self._open_next()
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]
            self._size += len(data)
        except OSError as e:
            # Cut off a partly written line: the log stays whole lines, as readers expect of a live segment.
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._size)
            # A full disk stops the run (what it could not log is what the next steps would lose too).
            raise_if_full(e, self._path())
            log.warning("tracking: could not write %d bytes of metrics to %s (%s); they are lost", len(data),
                        self.folder, e)

    def _path(self) -> Path:
        return self.folder / f"wal-{self._n:06d}.jsonl"

    def sync(self) -> None:
        """Everything appended so far is on disk when this returns (called before each checkpoint)."""
        self.write()
        try:
            os.fsync(self._fd)
        except OSError as e:
            raise_if_full(e, self._path())
            log.warning("tracking: could not sync the metric log in %s (%s)", self.folder, e)

    def close(self) -> None:
        try:
            self.sync()
        finally:
            os.close(self._fd)
            self._fd = -1


@dataclass(frozen=True)
class Cursor:
    segment: int = 0
    offset: int = 0


def read_cursor(folder: Path) -> Cursor:
    try:
        data = json.loads((folder / "cursor.json").read_text())
        return Cursor(int(data["segment"]), int(data["offset"]))
    except (OSError, ValueError, KeyError, TypeError):
        return Cursor()  # none yet (or damaged): start from the oldest segment; resending is harmless


def write_cursor(folder: Path, cursor: Cursor) -> None:
    """Move the cursor, then delete the segments before it. No fsync: a cursor lost in a crash only
    makes the next writer send some lines again."""
    tmp = folder / f".cursor.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps({"segment": cursor.segment, "offset": cursor.offset}))
    os.replace(tmp, folder / "cursor.json")
    for path in segments(folder):
        if _number(path) < cursor.segment:
            path.unlink(missing_ok=True)


def read(folder: Path, cursor: Cursor, limit: int | None = None) -> tuple[list[Line], Cursor]:
    """Whole lines from ``cursor`` on (stopping once about ``limit`` metrics are read), and the cursor
    after them. A segment with a newer one after it is complete: a cut last line there is skipped."""
    lines: list[Line] = []
    count = 0
    paths = segments(folder)
    for i, path in enumerate(paths):
        n = _number(path)
        if n < cursor.segment:
            continue
        complete = i + 1 < len(paths)
        offset = cursor.offset if n == cursor.segment else 0
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            continue
        with f:
            f.seek(offset)
            while limit is None or count < limit:
                raw = f.readline()
                if not raw:
                    break
                if not raw.endswith(b"\n"):
                    if not complete:
                        break  # the learner is writing this line right now
                    log.warning("tracking: skipping a line cut short by a crash in %s", path)
                offset += len(raw)
                line = _parse(raw, path)
                if line is not None:
                    lines.append(line)
                    count += len(line[2])
        cursor = Cursor(n, offset)
        if not complete or (limit is not None and count >= limit):
            break
        cursor = Cursor(_number(paths[i + 1]), 0)  # this one is read to its end: the next one starts
    return lines, cursor


def _parse(raw: bytes, path: Path) -> Line | None:
    try:
        step, ts, metrics = json.loads(raw)
        return int(step), int(ts), {str(k): float(v) for k, v in metrics.items()}
    except (ValueError, TypeError, AttributeError):
        if raw.strip():
            log.warning("tracking: skipping a damaged line in %s", path)
        return None


def pending_count(folder: Path) -> int:
    """Metrics in the log that the writer has not confirmed delivered."""
    if not folder.exists():
        return 0
    lines, _ = read(folder, read_cursor(folder))
    return sum(len(m) for _, _, m in lines)


def last_steps(folder: Path) -> dict[str, int]:
    """The last step of each metric key anywhere in the log (delivered or not)."""
    out: dict[str, int] = {}
    if folder.exists():
        for step, _, metrics in read(folder, Cursor())[0]:
            for k in metrics:
                if step > out.get(k, -1):
                    out[k] = step
    return out


def to_entries(lines: list[Line]) -> list[tuple[str, float, int, int]]:
    """(key, value, timestamp_ms, step) per metric, in log order."""
    return [(k, v, ts, step) for step, ts, metrics in lines for k, v in metrics.items()]
