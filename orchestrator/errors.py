"""Errors the run raises for the command line to report, and the one-line form of any exception."""

from __future__ import annotations

import errno
from pathlib import Path


class RunFailed(RuntimeError):
    """The run could not go on (not a user mistake); the message says what is left and how to continue."""


class DiskFull(RunFailed):
    """A file of the run could not be written because its device is full (or over quota)."""


def raise_if_full(error: OSError, path: Path | str) -> None:
    """``DiskFull`` naming ``path`` when ``error`` is a full device; otherwise return (the caller re-raises)."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        raise DiskFull(f"no space left on the device of {path}: could not write it") from None


def one_line(error: BaseException, limit: int = 200) -> str:
    """An exception's message on one line, at most ``limit`` characters (its type when it has no message)."""
    return " ".join(str(error).split())[:limit] or type(error).__name__
