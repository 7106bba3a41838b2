"""Replacing a file so that a crash at any moment leaves the old file or the new one, never half of one."""

from __future__ import annotations

import os
from pathlib import Path

from orchestrator.errors import raise_if_full


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write ``data`` to a temp file beside ``path``, flush it to disk, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise_if_full(e, path)  # the old file is untouched: only the temp file was being written
        raise
    finally:
        tmp.unlink(missing_ok=True)
