"""Ends every process of an embedded Ray session when the process that started it ends, however it ends.

A run that is SIGKILLed (or OOM-killed) cannot shut Ray down. Ray's processes notice at different speeds: its
workers within seconds, but its dashboard and runtime-env agents, finding their raylet gone, first report it to
the (equally dead) GCS with a fixed 60 s timeout, and live on for a minute. So an embedded session is started
with a marker in its environment, which every Ray process inherits, and a reaper: a small process in its own
session, holding a pipe from the run, which notes the session's processes every ``SCAN_S`` while the run lives
(Ray's agents retitle themselves, which hides the marker, and are found as the raylet's children). When the pipe
closes (the run shut Ray down, or died), the reaper sends SIGTERM to every process it noted or that carries the
marker, and every process below one, SIGKILL to any left after ``GRACE_S``, and exits.

    python -m orchestrator.workers.reaper MARKER     (started by ``Reaper.start``; stdin is the run's pipe)

Linux only (``/proc``); elsewhere ``Reaper.start`` returns None and Ray's own clean-up is all there is.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

MARK = "METARAY_RAY_SESSION"
GRACE_S = 2.0
SCAN_S = 1.0


class Reaper:
    """The run's end of the pipe. ``marker`` goes into the environment of the Ray processes to be reaped."""

    def __init__(self, proc: subprocess.Popen, marker: str):
        self.proc, self.marker = proc, marker

    @staticmethod
    def start() -> Reaper | None:
        if not Path("/proc/self/environ").exists():
            return None
        marker = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        env = {k: v for k, v in os.environ.items() if k != MARK}
        proc = subprocess.Popen([sys.executable, "-m", "orchestrator.workers.reaper", marker], stdin=subprocess.PIPE,
                                env=env, start_new_session=True)  # its own session: Ctrl-C to the run's group
        return Reaper(proc, marker)                                # does not stop it before it has reaped

    def stop(self, timeout_s: float = 10.0) -> None:
        """Close the pipe (after ``ray.shutdown``): the reaper ends what is left of the session, then exits."""
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def marked(marker: str, spare: tuple[int, ...] = ()) -> list[int]:
    """Live processes of the session, but for this one and ``spare``: those whose environment holds
    ``MARK=marker``, and every process below them. Ray's agents and workers retitle themselves
    (setproctitle), which overwrites the environment that /proc shows, so they are found as children of
    the raylet, which does not."""
    needle = f"{MARK}={marker}".encode()
    parent, found = {}, set()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            pid = int(proc.name)
            state, ppid = (proc / "stat").read_text().rsplit(")", 1)[1].split()[:2]
            if state == "Z":
                continue
            parent[pid] = int(ppid)
            if needle in (proc / "environ").read_bytes().split(b"\0"):
                found.add(pid)
        except (OSError, ValueError, IndexError):
            pass
    # Never through the spared ones: the run's own children (its metric writer) are not the session's.
    found -= {os.getpid(), *spare}
    frontier = set(found)
    while frontier:
        frontier = {pid for pid, ppid in parent.items()
                    if ppid in frontier and pid not in found and pid not in (os.getpid(), *spare)}
        found |= frontier
    return sorted(found)


def started(pid: int) -> str | None:
    """When ``pid`` started (clock ticks since boot), or None if it is gone or a zombie: tells a process from a
    later one that reuses its pid."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] == "Z" else fields[19]


def reap(marker: str, spare: tuple[int, ...] = (), known: dict[int, str | None] | None = None,
         give_up_s: float = 30.0) -> None:
    """SIGTERM to each, SIGKILL to those left after ``GRACE_S``, until none is left (a process that is
    dying may still start one) or ``give_up_s`` has passed. ``known``: processes of the session seen while
    it ran (pid -> start time), for those that can no longer be found as such."""
    known = known or {}

    def alive() -> list[int]:
        found = set(marked(marker, spare))
        return sorted(found | {pid for pid, start in known.items() if start is not None and started(pid) == start})

    start, termed = time.monotonic(), set()
    pids = alive()
    while pids and time.monotonic() - start < give_up_s:
        late = time.monotonic() - start > GRACE_S
        for pid in pids:
            if late or pid not in termed:
                try:
                    os.kill(pid, signal.SIGKILL if late else signal.SIGTERM)
                except OSError:
                    pass
                termed.add(pid)
        time.sleep(0.05)
        pids = alive()


def main() -> None:
    marker, run = sys.argv[1], os.getppid()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # While the run lives, note its session's processes every SCAN_S: when the run is SIGKILLed its raylet dies
    # with it (Ray ties it to the run), and the raylet's agents, retitled and orphaned, are found only this way.
    known: dict[int, str | None] = {}
    while True:
        ready, _, _ = select.select([sys.stdin], [], [], SCAN_S)
        if ready and not os.read(sys.stdin.fileno(), 65536):
            break  # EOF: the run closed the pipe, or died
        for pid in marked(marker, spare=(run,)):
            if pid not in known:
                known[pid] = started(pid)
    reap(marker, spare=(run,), known=known)  # the run itself, if alive, is never one of them


if __name__ == "__main__":
    main()
