"""Conversion: labelled image files (in folders or zips) -> an image store, with the checks every source shares.

The source modules (``tasks.converters.omniglot``, ``tasks.converters.miniimagenet``,
``tasks.converters.imagefolder``) only know their layout: they list which files make up
which class (``ClassFiles``). This module does the rest the same way for all
of them: decode each image with Pillow, convert it to greyscale ("L") or RGB,
resize it (bilinear, Pillow's antialiased downscaling) to [H, W], optionally
invert it, and stream the classes into a ``StoreWriter``.

Bad input is a ``DataError`` naming the file or class and the fix, raised
before the destination is touched; with ``skip_bad=True`` the bad image or
class is left out instead and listed, one line each, in ``<store>.skipped.txt``:
an unreadable image, an empty class, a class with fewer than ``min_per_class``
images, a class name seen twice. Classes are checked before any image is
decoded, so layout mistakes fail at once, not after an hour of decoding.
"""

from __future__ import annotations

import io
import os
import zipfile
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Sequence

import numpy as np
from PIL import Image

from tasks.store import DataError
from tasks.store_writer import StoreWriter, check_destination, skipped_path

Progress = Callable[[int, int], None]
"""Called as ``progress(images_done, images_total)`` while converting."""


@dataclass(frozen=True)
class ImageRef:
    """One source file: ``member`` ('/'-separated) of ``container``, a folder or a zip file."""

    container: Path
    member: str

    def __str__(self) -> str:
        return f"{self.container}:{self.member}" if self.container.is_file() else str(self.container / self.member)


@dataclass(frozen=True)
class ClassFiles:
    """The files of one class as a source lists them; ``where`` says where it came from, for messages."""

    name: str
    group: str
    files: tuple[ImageRef, ...]
    where: str


@dataclass(frozen=True)
class Conversion:
    """What a conversion wrote: the store, its size, and what it left out (``skipped``, one line each)."""

    dest: Path
    num_classes: int
    num_images: int
    skipped: tuple[str, ...]

    @property
    def skipped_path(self) -> Path | None:
        return skipped_path(self.dest) if self.skipped else None


class SourceTree:
    """A dataset source, a folder or a zip file, as sorted '/'-separated file and folder paths.

    Hidden entries (``.DS_Store``, ``.git``) and ``__MACOSX`` folders are not listed.
    """

    def __init__(self, path: str | Path, kind: str) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise DataError(f"{kind} source {self.path} does not exist; check the path")
        if self.path.is_dir():
            files, dirs = [], set()
            for top, subdirs, names in os.walk(self.path):
                subdirs[:] = [d for d in subdirs if _visible(d)]
                rel = Path(top).relative_to(self.path).as_posix()
                prefix = "" if rel == "." else f"{rel}/"
                dirs.update(prefix + d for d in subdirs)
                files.extend(prefix + n for n in names if _visible(n))
        elif zipfile.is_zipfile(self.path):
            with zipfile.ZipFile(self.path) as z:
                names = [n for n in z.namelist() if all(_visible(p) for p in n.rstrip("/").split("/"))]
            files = [n for n in names if not n.endswith("/")]
            dirs = {n.rstrip("/") for n in names if n.endswith("/")}
            dirs.update("/".join(f.split("/")[:i]) for f in files for i in range(1, f.count("/") + 1))
        else:
            raise DataError(f"{kind} source {self.path} is neither a folder nor a (readable) zip file")
        self.files: list[str] = sorted(files)
        self.dirs: list[str] = sorted(dirs)

    def ref(self, member: str) -> ImageRef:
        return ImageRef(self.path, member)


def _visible(name: str) -> bool:
    return not name.startswith(".") and name != "__MACOSX"


class FileReader:
    """Reads ``ImageRef`` bytes, keeping each zip open once (a context manager)."""

    def __init__(self) -> None:
        self._stack, self._zips = ExitStack(), {}

    def read(self, ref: ImageRef) -> bytes:
        if ref.container.is_dir():
            return (ref.container / ref.member).read_bytes()
        if ref.container not in self._zips:
            self._zips[ref.container] = self._stack.enter_context(zipfile.ZipFile(ref.container))
        return self._zips[ref.container].read(ref.member)

    def __enter__(self) -> "FileReader":
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()


def decode(data: bytes, mode: Literal["L", "RGB"], size: tuple[int, int], invert: bool = False) -> np.ndarray:
    """One encoded image -> uint8 [C, H, W]: convert to ``mode``, resize to ``size`` = (H, W), optionally invert."""
    with Image.open(io.BytesIO(data)) as img:
        img = img.convert(mode)
    if img.size != (size[1], size[0]):
        img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    pixels = np.asarray(img, dtype=np.uint8)
    pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    return 255 - pixels if invert else np.ascontiguousarray(pixels)


UNREADABLE = (OSError, ValueError, SyntaxError, KeyError, EOFError, zipfile.BadZipFile, Image.DecompressionBombError)


def convert(classes: Sequence[ClassFiles], dest: str | Path, *, mode: Literal["L", "RGB"], size: tuple[int, int],
            source: str, preprocessing: str, invert: bool = False, min_per_class: int = 1, skip_bad: bool = False,
            overwrite: bool = False, progress: Progress | None = None) -> Conversion:
    """Decode ``classes`` into a new store at ``dest`` (atomically; see the module docstring for the checks)."""
    dest = Path(dest)
    if min_per_class < 1:
        raise DataError(f"min_per_class must be >= 1, got {min_per_class}")
    check_destination(dest, overwrite)
    skipped: list[str] = []

    def bad(line: str, fix: str) -> None:
        if not skip_bad:
            raise DataError(f"{line}; {fix}, or pass --skip-bad (skip_bad=True) to leave it out")
        skipped.append(line)

    kept, seen = [], {}
    for c in classes:
        if c.name in seen:
            bad(f"class {c.name!r} appears twice: in {seen[c.name]} and in {c.where}",
                "rename one of them or convert them into separate stores")
        elif not c.files:
            bad(f"class {c.name!r} ({c.where}) has no images", "remove the empty folder")
        elif len(c.files) < min_per_class:
            bad(f"class {c.name!r} ({c.where}) has {len(c.files)} images, fewer than the {min_per_class} required "
                "(min_per_class)", "add images or lower --min-per-class")
        else:
            kept.append(c)
        seen.setdefault(c.name, c.where)

    total, done = sum(len(c.files) for c in kept), 0
    shape = (1 if mode == "L" else 3, *size)
    num_classes = num_images = 0
    with StoreWriter(dest, shape, source=source, preprocessing=preprocessing, overwrite=overwrite) as writer, \
            FileReader() as reader:
        for c in kept:
            pixels = []
            for ref in c.files:
                try:
                    pixels.append(decode(reader.read(ref), mode, size, invert))
                except UNREADABLE as e:
                    bad(f"image {ref} (class {c.name!r}) cannot be read: {error_reason(e)}",
                        "replace or delete the file")
                done += 1
                if progress is not None:
                    progress(done, total)
            if len(pixels) < min_per_class:
                bad(f"class {c.name!r} ({c.where}) has {len(pixels)} readable images, fewer than the "
                    f"{min_per_class} required (min_per_class)", "fix its images or lower --min-per-class")
                continue
            writer.add_class(c.name, c.group, np.stack(pixels))
            num_classes, num_images = num_classes + 1, num_images + len(pixels)
        writer.skipped = skipped
    return Conversion(dest, num_classes, num_images, tuple(skipped))


def error_reason(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


@dataclass(frozen=True)
class ClassArrays:
    """One class of a source that holds pixels (pickled arrays) rather than image files: ``load()`` gives them,
    uint8 [n, C, H, W] at the store's size; ``count`` is known before loading."""

    name: str
    group: str
    count: int
    load: Callable[[], np.ndarray]
    where: str


def write_arrays(classes: Sequence[ClassArrays], dest: str | Path, shape: tuple[int, int, int], *, source: str,
                 preprocessing: str, min_per_class: int = 1, skip_bad: bool = False, overwrite: bool = False,
                 progress: Progress | None = None) -> Conversion:
    """Stream ``classes`` into a new store at ``dest`` (atomically), with ``convert``'s class checks."""
    dest = Path(dest)
    if min_per_class < 1:
        raise DataError(f"min_per_class must be >= 1, got {min_per_class}")
    check_destination(dest, overwrite)
    skipped: list[str] = []
    kept = []
    for c in classes:
        if c.count < min_per_class:
            line = (f"class {c.name!r} ({c.where}) has {c.count} images, fewer than the {min_per_class} required "
                    "(min_per_class)")
            if not skip_bad:
                raise DataError(f"{line}; lower --min-per-class, or pass --skip-bad (skip_bad=True) to leave it out")
            skipped.append(line)
        else:
            kept.append(c)
    total, done = sum(c.count for c in kept), 0
    with StoreWriter(dest, shape, source=source, preprocessing=preprocessing, overwrite=overwrite) as writer:
        for c in kept:
            writer.add_class(c.name, c.group, c.load())
            done += c.count
            if progress is not None:
                progress(done, total)
        writer.skipped = skipped
    return Conversion(dest, len(kept), total, tuple(skipped))


def resize(pixels: np.ndarray, size: int) -> np.ndarray:
    """uint8 [n, C, h, w] -> [n, C, size, size] as ``decode`` resizes (Pillow, bilinear); unchanged at its size."""
    n, c, h, w = pixels.shape
    if (h, w) == (size, size):
        return np.ascontiguousarray(pixels)
    out = np.empty((n, c, size, size), dtype=np.uint8)
    for i, image in enumerate(pixels):
        img = Image.fromarray(image[0] if c == 1 else image.transpose(1, 2, 0))
        small = np.asarray(img.resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)
        out[i] = small[None] if c == 1 else small.transpose(2, 0, 1)
    return out
