"""The ``metaray`` command line: ``main`` (train, eval, sweep, ui, deliver) and ``data`` (convert, verify)."""

from orchestrator.cli.main import main

__all__ = ["main"]
