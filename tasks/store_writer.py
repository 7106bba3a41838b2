"""Writing an image store atomically (the format is described in ``tasks.store``).

A conversion can fail half-way (a corrupt image, a full disk, Ctrl-C). The
writer therefore builds the store in a temp folder beside the destination and
renames it into place only when it is complete, so the destination name holds
either nothing or a whole store. Rows are first streamed class by class into a
scratch IPC file (bounded memory), then copied into the final file whose schema
carries the metadata only known at the end (class index, content hash).

>>> with StoreWriter("omniglot.arrow", (1, 28, 28), source="omniglot", preprocessing="28x28, inverted") as w:
...     w.add_class("Greek/character01", "Greek", pixels)   # uint8 [n, 1, 28, 28]
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa

from tasks.store import DataError, class_checksum, hash_class, store_schema


def skipped_path(dest: str | Path) -> Path:
    """Where a conversion with ``skip_bad`` lists what it left out: ``<store>.skipped.txt``."""
    return Path(f"{dest}.skipped.txt")


class StoreWriter:
    """Writes a store atomically: everything is built in a temp folder beside ``dest``, then renamed.

    Use it as a context manager: leaving the block normally commits, an exception
    (or Ctrl-C) removes the temp folder, so a half-written store never appears
    under ``dest``. An existing ``dest`` is refused unless ``overwrite=True``.
    ``skipped`` lines, if any, are committed with the store as ``<dest>.skipped.txt``.
    """

    def __init__(self, dest: str | Path, image_shape: Sequence[int], *, source: str, preprocessing: str,
                 overwrite: bool = False) -> None:
        self.dest, self.overwrite = Path(dest), overwrite
        self.shape = tuple(int(s) for s in image_shape)
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise ValueError(f"image_shape must be [C, H, W] with positive sizes, got {list(image_shape)}")
        check_destination(self.dest, overwrite)
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        self._meta = {"source": source, "preprocessing": preprocessing, "image_shape": list(self.shape)}
        self._classes: list[dict] = []
        self._num_rows = 0
        self._names: set[str] = set()
        self._hash = hashlib.sha256(repr(self.shape).encode())
        self.skipped: list[str] = []
        self._tmp = Path(tempfile.mkdtemp(prefix=f".{self.dest.name}.", suffix=".tmp", dir=self.dest.parent))
        try:
            self._rows = pa.ipc.new_file(str(self._tmp / "rows.arrow"), store_schema(self.shape))
        except BaseException:
            shutil.rmtree(self._tmp, ignore_errors=True)
            raise

    def add_class(self, name: str, group: str, pixels: np.ndarray) -> None:
        """Append one class: ``pixels`` is uint8 ``[n, C, H, W]`` with n >= 1."""
        if name in self._names:
            raise DataError(f"class {name!r} is added twice; class names must be unique within a store")
        if pixels.dtype != np.uint8 or pixels.shape[1:] != self.shape or len(pixels) == 0:
            raise ValueError(f"class {name!r}: expected uint8 [n>=1, {', '.join(map(str, self.shape))}], "
                             f"got {pixels.dtype} {list(pixels.shape)}")
        n, start = len(pixels), self._num_rows
        flat = pa.array(np.ascontiguousarray(pixels).reshape(-1))
        batch = pa.RecordBatch.from_arrays([
            pa.array(np.full(n, len(self._classes), dtype=np.int32)),
            pa.array([name] * n, pa.string()),
            pa.array([group] * n, pa.string()),
            pa.FixedSizeListArray.from_arrays(flat, int(np.prod(self.shape))),
        ], schema=store_schema(self.shape))
        self._rows.write_batch(batch)
        hash_class(self._hash, name, group, pixels)
        self._classes.append({"name": name, "group": group, "start": start, "stop": start + n,
                              "crc32": class_checksum(pixels)})
        self._names.add(name)
        self._num_rows += n

    def commit(self) -> Path:
        """Write the final file (rows + metadata) in the temp folder and rename it to ``dest``."""
        try:
            self._rows.close()
            if not self._classes:
                raise DataError(f"no classes to write to {self.dest}: every class was empty or skipped")
            meta = dict(self._meta, classes=self._classes, num_images=self._num_rows,
                        content_hash=f"sha256:{self._hash.hexdigest()}")
            final, schema = self._tmp / "store.arrow", store_schema(self.shape, meta)
            with pa.memory_map(str(self._tmp / "rows.arrow")) as src, pa.OSFile(str(final), "wb") as sink:
                rows = pa.ipc.open_file(src)
                with pa.ipc.new_file(sink, schema) as out:
                    for i in range(rows.num_record_batches):
                        out.write_batch(rows.get_batch(i))
            with open(final, "rb+") as f:
                os.fsync(f.fileno())
            self._publish(final)
        finally:
            self.abort()
        return self.dest

    def _publish(self, final: Path) -> None:
        if self.overwrite:
            os.replace(final, self.dest)
        else:
            try:  # link, unlike rename, refuses to replace a store that appeared meanwhile
                os.link(final, self.dest)
            except FileExistsError:
                check_destination(self.dest, overwrite=False)  # raises: says what exists and what to do
                raise
            except OSError:  # a filesystem without hard links
                check_destination(self.dest, overwrite=False)
                os.replace(final, self.dest)
        skipped = skipped_path(self.dest)
        if self.skipped:
            (self._tmp / "skipped.txt").write_text("".join(f"{line}\n" for line in self.skipped))
            os.replace(self._tmp / "skipped.txt", skipped)
        elif skipped.exists():
            skipped.unlink()  # a stale list from the store this one replaced

    def abort(self) -> None:
        """Drop everything written so far; ``dest`` is left as it was."""
        try:
            self._rows.close()
        except (OSError, pa.ArrowException):
            pass
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def check_destination(dest: Path, overwrite: bool) -> None:
    """Refuse early (before any work) a destination that is a folder, or an existing store without overwrite."""
    if dest.is_dir():
        raise DataError(f"{dest} is a folder; give the store a file name, e.g. {dest / 'store.arrow'}")
    if dest.exists() and not overwrite:
        raise DataError(f"{dest} already exists; pass overwrite=True (--overwrite) to replace it")


