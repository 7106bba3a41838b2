"""Ends every process of an embedded Ray session when the process that started it ends, however it ends.

A run that is SIGKILLed (or OOM-killed) cannot shut Ray down. Ray's processes notice at different speeds: its
workers within seconds, but its dashboard and runtime-env agents, finding their raylet gone, first report it to
the (equally dead) GCS with a fixed 60 s timeout, and live on for a minute. So an embedded session is started
with a marker in its environment, which every Ray process inherits, and a reaper: a small process in its own
session, holding a pipe from the run. When the pipe closes (the run shut Ray down, or died), the reaper sends
SIGTERM to every process carrying the marker, SIGKILL to any left after ``GRACE_S``, and exits.

    python -m orchestrator.workers.reaper MARKER     (started by ``Reaper.start``; stdin is the run's pipe)

Linux only (``/proc``); elsewhere ``Reaper.start`` returns None and Ray's own clean-up is all there is.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

MARK = "METARAY_RAY_SESSION"
GRACE_S = 2.0


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
    """Live processes whose environment holds ``MARK=marker``, but for this one and ``spare``."""
    needle = f"{MARK}={marker}".encode()
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if int(proc.name) not in (os.getpid(), *spare) and needle in (proc / "environ").read_bytes().split(b"\0"):
                state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    found.append(int(proc.name))
        except (OSError, ValueError, IndexError):
            pass
    return found


def reap(marker: str, spare: tuple[int, ...] = ()) -> None:
    for sig, wait_s in ((signal.SIGTERM, GRACE_S), (signal.SIGKILL, 0.0)):
        pids = marked(marker, spare)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + wait_s
        while pids and time.monotonic() < deadline:
            time.sleep(0.05)
            pids = marked(marker, spare)
        if not pids:
            return


def main() -> None:
    marker, run = sys.argv[1], os.getppid()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.stdin.buffer.read()  # returns at EOF: the run closed the pipe, or died
    reap(marker, spare=(run,))  # the run itself, if alive, is never one of them


if __name__ == "__main__":
    main()
