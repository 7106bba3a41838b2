"""The file behind a local MLflow store, and the lock that lets several processes create it at once."""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path


def store_file(uri: str) -> Path | None:
    """The file behind a SQLite or file-store URI; None for a database server."""
    if uri.startswith("sqlite:"):
        path = uri.removeprefix("sqlite:///") if uri.startswith("sqlite:///") else ""
        return Path(path) if path else None  # "sqlite://" is an in-memory database
    if uri.startswith("file:"):
        return Path(uri.removeprefix("file:").removeprefix("//"))
    return Path(uri) if uri.startswith(("/", ".")) else None


@contextlib.contextmanager
def first_touch(uri: str) -> Iterator[None]:
    """Holds an exclusive lock on ``<store>.lock`` beside a SQLite store while a process opens it: MLflow creates
    and migrates a new store's tables on first connection, and two processes doing that at once fail ("duplicate
    column name"), e.g. two `metaray train` started together in a folder with no mlflow.db yet."""
    path = store_file(uri) if uri.startswith("sqlite:") else None
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
