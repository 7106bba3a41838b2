"""The installed metaray's version, as the CLI prints it and MLflow runs are tagged with."""

from __future__ import annotations

from importlib import metadata


def version() -> str:
    """The installed metaray distribution's version ("unknown" when run from a source tree not installed)."""
    try:
        return metadata.version("metaray")
    except metadata.PackageNotFoundError:
        return "unknown"
