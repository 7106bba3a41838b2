"""Errors the run raises for the command line to report, and the one-line form of any exception."""

from __future__ import annotations


class RunFailed(RuntimeError):
    """The run could not go on (not a user mistake); the message says what is left and how to continue."""


def one_line(error: BaseException, limit: int = 200) -> str:
    """An exception's message on one line, at most ``limit`` characters (its type when it has no message)."""
    return " ".join(str(error).split())[:limit] or type(error).__name__
