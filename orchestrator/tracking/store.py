"""Which MLflow store a run tracks to, the file behind a local one, and the lock that lets several processes
create it at once."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from orchestrator.config import Config

DEFAULT_URI = "sqlite:///mlflow.db"


class TrackingError(ValueError):
    """The tracking store named by the config or environment cannot be used."""


def experiment_name(cfg: Config) -> str:
    """The MLflow experiment a run of ``cfg`` is recorded in."""
    return cfg.tracking.experiment or f"metaray-{cfg.task.family}"


def resolve_uri(cfg: Config) -> str:
    return cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


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


def absolute_uri(uri: str) -> str:
    """A relative SQLite path made absolute, so that ``metaray deliver`` works from any directory."""
    path = store_file(uri) if uri.startswith("sqlite:") else None
    return f"sqlite:///{os.path.abspath(path)}" if path is not None and not path.is_absolute() else uri
