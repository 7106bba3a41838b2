"""The class-indexed image store: one Arrow IPC file per dataset, read memory-mapped.

Few-shot episodes need "k images of class c" fast, from every worker on a node,
without each worker holding its own copy of the dataset. A store is therefore
one uncompressed Arrow IPC *file* (not a stream: it has a footer that lets a
reader jump to any record batch) that ``ImageStore.open`` maps with
``pa.memory_map``; ``images(c)`` returns a read-only numpy view into the map.
The pixels live in the OS page cache, shared by all processes that open the
same file, and are paged in only when an episode touches them.

Schema (one row per image; rows grouped by class, one record batch per class)::

    class_id    int32                          index of the class in this store, 0..num_classes-1
    class_name  string                         unique, e.g. "Greek/character01", "n01532829"
    group       string                         e.g. the Omniglot alphabet or miniImageNet split; "" when none
    image       fixed_size_list<uint8>[C*H*W]  the pixels, CHW order, the same shape for every row

Schema metadata (utf-8 bytes):

    metaray.format          "metaray-image-store"
    metaray.format_version  "2" (``FORMAT_VERSION``; ``open`` also reads version 1, refuses others)
    metaray.store           JSON: {"source", "image_shape": [C, H, W], "preprocessing",
                            "num_images", "content_hash": "sha256:...",
                            "classes": [{"name", "group", "start", "stop", "crc32"}, ...]}

``classes[i]`` is class i with its row range [start, stop) (the role of
Meta-Dataset's ``dataset_spec.json``). ``content_hash`` is a sha256 over the
image shape and, class by class, the name, group, image count and pixels:
two stores with the same hash hold the same labelled images.

Integrity. Pixels altered after writing (a bad disk, a bad copy, an edit)
must never train silently, yet re-hashing a whole store at every open would
cost seconds per worker. So each class carries the CRC-32 of its pixels
(version 2), checked the first time this process reads that class
(``images``): a class is paid for once per process, when an episode first
needs it, at zlib's ~2 GB/s (CRC-32 rather than sha256: twice as fast here,
and the per-class sums guard against accidents, not forgers, who could rewrite
them too). ``verify`` (``metaray data verify``) re-hashes everything against
both the class sums and the content hash. A version-1 store (no class sums)
still opens; its first read verifies the whole content hash once instead.

Stores are written by ``tasks.store_writer.StoreWriter`` (atomically) and
read by ``ImageStore``:

>>> store = ImageStore.open("omniglot.arrow")
>>> store.num_classes, store.class_names[0], store.groups[0]
(242, 'Balinese/character01', 'Balinese')
>>> store.images(0).shape                                    # (20, 1, 28, 28) uint8, a view into the map
"""

from __future__ import annotations

import hashlib
import json
import re
import zlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

FORMAT = "metaray-image-store"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
_KEY_FORMAT, _KEY_VERSION, _KEY_STORE = b"metaray.format", b"metaray.format_version", b"metaray.store"


class DataError(ValueError):
    """A user mistake about data (dataset folder, store file); one line naming the path/class and the fix."""


def store_schema(shape: Sequence[int], meta: dict | None = None) -> pa.Schema:
    """The Arrow schema of a store of [C, H, W] images; with ``meta`` (the JSON part), the final file's."""
    fields = [
        ("class_id", pa.int32()),
        ("class_name", pa.string()),
        ("group", pa.string()),
        ("image", pa.list_(pa.uint8(), int(np.prod(shape)))),
    ]
    if meta is None:
        return pa.schema(fields)
    return pa.schema(fields, metadata={
        _KEY_FORMAT: FORMAT.encode(),
        _KEY_VERSION: str(FORMAT_VERSION).encode(),
        _KEY_STORE: json.dumps(meta, sort_keys=True).encode(),
    })


def hash_class(h: Any, name: str, group: str, pixels: np.ndarray) -> None:
    """Feed one class into the content hash (a ``hashlib.sha256``), the same way writer and ``verify`` do."""
    h.update(f"{name}\0{group}\0{len(pixels)}\0".encode())
    h.update(np.ascontiguousarray(pixels).data)


def class_checksum(pixels: np.ndarray) -> int:
    """The CRC-32 of one class's pixel bytes, recorded by the writer and checked at first read."""
    return zlib.crc32(np.ascontiguousarray(pixels).data)


class ImageStore:
    """A store opened memory-mapped: class names, groups, and per-class pixel views.

    Open it with ``ImageStore.open(path)``. Nothing is read up front beyond the
    footer and the per-class batch headers; ``images(c)`` is a read-only view
    into the map, so opening the same store in several processes costs each
    only its bookkeeping, and the pixels are shared through the page cache.
    Pickling a store pickles its path (and content hash), never its pixels.
    """

    def __init__(self, path: Path, mmap: pa.MemoryMappedFile, views: list[np.ndarray], meta: dict[str, Any]) -> None:
        self.path, self._mmap, self._views, self._meta = path, mmap, views, meta
        self._whole = _whole_map(mmap)
        classes = meta["classes"]
        self.class_names: tuple[str, ...] = tuple(c["name"] for c in classes)
        """Class names in class-index order; unique."""
        self.groups: tuple[str, ...] = tuple(c["group"] for c in classes)
        """The group of each class (aligned with ``class_names``), e.g. its alphabet; "" when none."""
        self.image_shape: tuple[int, int, int] = tuple(meta["image_shape"])
        self.source: str = meta["source"]
        self.preprocessing: str = meta["preprocessing"]
        self.content_hash: str = meta["content_hash"]
        self.num_images: int = meta["num_images"]
        self.format_version: int = meta["format_version"]
        self._index = {name: i for i, name in enumerate(self.class_names)}
        self._checksums: list[int | None] = [c.get("crc32") for c in classes]
        self._checked = [False] * len(classes)

    @classmethod
    def open(cls, path: str | Path, *, verify: bool = False) -> "ImageStore":
        """Map the store at ``path`` and check its format; ``verify=True`` also re-hashes every pixel."""
        path = Path(path).absolute()  # pickled as its path: a worker with another cwd must find it too
        if not path.is_file():
            what = "is a folder, not a store file" if path.is_dir() else "does not exist"
            raise DataError(f"image store {path} {what}; create one with `metaray data convert ...`")
        try:
            mmap = pa.memory_map(str(path))
            reader = pa.ipc.open_file(mmap)
            batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{path} is not a readable image store (truncated, or not an Arrow IPC file: "
                            f"{(str(e).splitlines() or [type(e).__name__])[0]}); convert the dataset again") from None
        meta = _check_meta(path, reader.schema, [len(b) for b in batches])
        views = [_pixels(path, b.column(3), meta["image_shape"]) for b in batches]
        store = cls(path, mmap, views, meta)
        if verify:
            store.verify()
        return store

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def count(self, class_index: int) -> int:
        """Number of images of class ``class_index`` (from the index: reads no pixels)."""
        self._in_range(class_index)
        return len(self._views[class_index])

    def images(self, class_index: int) -> np.ndarray:
        """All images of one class: uint8 [n, C, H, W], a read-only view into the memory map (no copy).

        The first read of a class in this process checks its pixels against the checksum recorded at
        write time (a ``DataError`` when they differ).
        """
        self._in_range(class_index)
        if not self._checked[class_index]:
            self._check(class_index)
        return self._views[class_index]

    def _in_range(self, class_index: int) -> None:
        if not 0 <= class_index < len(self._views):
            raise IndexError(f"class index {class_index} is out of range for a store of {len(self._views)} classes")

    def _check(self, class_index: int) -> None:
        expected = self._checksums[class_index]
        if expected is None:  # a version-1 store has no class sums: check everything once
            self.verify()
            return
        if class_checksum(self._views[class_index]) != expected:
            raise DataError(f"{self.path} is corrupt: the pixels of class {self.class_names[class_index]!r} do not "
                            "match the checksum written with them; convert the dataset again "
                            f"(`metaray data verify {self.path}` checks the whole store)")
        self._checked[class_index] = True

    def class_index(self, name: str) -> int:
        """The index of the class called ``name``."""
        try:
            return self._index[name]
        except KeyError:
            raise DataError(f"{self.path} has no class {name!r}") from None

    def is_mapped(self, array: np.ndarray) -> bool:
        """True when ``array``'s memory lies inside this store's memory map (a zero-copy view, not a copy)."""
        start, end = self._whole.address, self._whole.address + self._whole.size
        return start <= array.ctypes.data and array.ctypes.data + array.nbytes <= end

    @property
    def nbytes(self) -> int:
        """Size of the store file in bytes."""
        return self._mmap.size()

    def verify(self) -> None:
        """Re-hash labels and pixels (reads the whole file) against the class checksums and the content hash."""
        h = hashlib.sha256(repr(self.image_shape).encode())
        for i, (name, group, pixels) in enumerate(zip(self.class_names, self.groups, self._views)):
            expected = self._checksums[i]
            if expected is not None and class_checksum(pixels) != expected:
                raise DataError(f"{self.path} is corrupt: the pixels of class {name!r} do not match the checksum "
                                "written with them; convert the dataset again")
            hash_class(h, name, group, pixels)
        if f"sha256:{h.hexdigest()}" != self.content_hash:
            raise DataError(f"{self.path} is corrupt: its pixels or labels do not match its content hash; "
                            "convert the dataset again")
        self._checked = [True] * len(self._views)

    def __reduce__(self) -> tuple:
        return _reopen, (str(self.path), self.content_hash)

    def __repr__(self) -> str:
        c, h, w = self.image_shape
        return f"ImageStore({str(self.path)!r}: {self.num_classes} classes, {self.num_images} images {c}x{h}x{w})"


def _pixels(path: Path, images: pa.FixedSizeListArray, shape: list[int]) -> np.ndarray:
    """A read-only [n, C, H, W] view of one batch's image column, straight on the mapped buffer.

    (``np.frombuffer`` rather than ``to_numpy``: the latter imports pandas, ~25 MB per worker, for nothing.)
    """
    flat = images.flatten()
    if images.null_count or flat.null_count:
        raise DataError(f"{path} is corrupt (an image is null); convert the dataset again")
    view = np.frombuffer(flat.buffers()[1], dtype=np.uint8, count=len(flat), offset=flat.offset)
    return view.reshape(-1, *shape)


def _whole_map(mmap: pa.MemoryMappedFile) -> pa.Buffer:
    """The whole file as one zero-copy buffer of the map (its address tells views from copies)."""
    position = mmap.tell()
    mmap.seek(0)
    whole = mmap.read_buffer(mmap.size())
    mmap.seek(position)
    return whole


def _reopen(path: str, content_hash: str) -> ImageStore:
    store = ImageStore.open(path)
    if store.content_hash != content_hash:
        raise DataError(f"the image store at {path} changed since it was opened (content hash differs); "
                        "give every process the same store file")
    return store


def is_content_hash(value: object) -> bool:
    """``sha256:`` and 64 lowercase hex digits, as ``StoreWriter`` writes it (and nothing a path could hide in)."""
    return isinstance(value, str) and re.fullmatch(r"sha256:[0-9a-f]{64}", value) is not None


def _check_meta(path: Path, schema: pa.Schema, batch_lengths: list[int]) -> dict[str, Any]:
    """The store's metadata, after checking it against the file's actual schema and record batches."""
    md = schema.metadata or {}
    if md.get(_KEY_FORMAT) != FORMAT.encode():
        raise DataError(f"{path} is an Arrow file but not a metaray image store; convert the dataset with "
                        "`metaray data convert ...`")
    version = md.get(_KEY_VERSION, b"?").decode(errors="replace")
    if version not in {str(v) for v in READABLE_VERSIONS}:
        readable = " and ".join(str(v) for v in READABLE_VERSIONS)
        raise DataError(f"{path} has image store format version {version}, this metaray reads versions "
                        f"{readable}; convert the dataset again with this version")

    def corrupt(why: str) -> DataError:
        return DataError(f"{path} is corrupt ({why}); convert the dataset again")

    try:
        meta = json.loads(md[_KEY_STORE])
        shape, classes = [int(s) for s in meta["image_shape"]], meta["classes"]
        bounds = [(str(c["name"]), str(c["group"]), int(c["start"]), int(c["stop"])) for c in classes]
        sums = [c.get("crc32") for c in classes]
        if version != "1" and not all(isinstance(v, int) and not isinstance(v, bool) for v in sums):
            raise KeyError("crc32")
        missing = [k for k in ("source", "preprocessing", "content_hash", "num_images") if k not in meta]
        if missing:
            raise KeyError(", ".join(missing))
        if not is_content_hash(meta["content_hash"]):  # it names the cached copy a worker node makes of the store
            raise ValueError(f"content_hash {str(meta['content_hash'])[:80]!r} is not sha256:<64 hex digits>")
    except (KeyError, TypeError, ValueError) as e:
        raise corrupt(f"unreadable store metadata: {type(e).__name__} {e}") from None
    if len(shape) != 3 or not schema.remove_metadata().equals(store_schema(shape)):
        raise corrupt(f"its columns do not match the store schema for images of shape {shape}")
    if len(bounds) != len(batch_lengths):
        raise corrupt(f"{len(bounds)} classes in the index but {len(batch_lengths)} record batches")
    stop = 0
    for (name, _, start, end), n in zip(bounds, batch_lengths):
        if start != stop or end - start != n or n < 1:
            raise corrupt(f"class {name!r} has rows [{start}, {end}) in the index but {n} rows in the file")
        stop = end
    if stop != meta["num_images"] or len({b[0] for b in bounds}) != len(bounds):
        raise corrupt("the class index does not match the number of images, or repeats a class name")
    meta["image_shape"], meta["format_version"] = shape, int(version)
    return meta
