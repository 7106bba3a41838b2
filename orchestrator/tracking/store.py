"""Which MLflow store a run tracks to, the file behind a local one, and the lock that lets several processes
create it at once."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

from orchestrator.config import Config
from orchestrator.config.sections import mask_secrets

DEFAULT_URI = "sqlite:///mlflow.db"
USERNAME, PASSWORD = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"


class TrackingError(ValueError):
    """The tracking store named by the config or environment cannot be used."""


def experiment_name(cfg: Config) -> str:
    """The MLflow experiment a run of ``cfg`` is recorded in."""
    return cfg.tracking.experiment or f"metaray-{cfg.task.family}"


def resolve_uri(cfg: Config) -> str:
    """The store's URI without credentials: a user and password in it (``http://user:secret@host``) move to
    MLflow's own variables, MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, of this process and the
    processes it starts (the metric writer, an embedded Ray's workers), so that no URI with a password is ever
    printed, logged or saved. A password saved as *** (a checkpoint's config) is taken from those variables."""
    uri = cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    if parts.password != "***":
        os.environ[USERNAME] = unquote(parts.username or "")
        os.environ[PASSWORD] = unquote(parts.password)
    elif not os.environ.get(PASSWORD):
        raise TrackingError(f"tracking.uri: {mask_secrets(uri)}: its password is never saved with a run; set "
                            f"{PASSWORD} (or pass the whole URI again with --set tracking.uri=...)")
    host = parts.hostname + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=host))


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
