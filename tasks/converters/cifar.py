"""CIFAR-FS and FC100, the few-shot benchmarks of MetaOptNet's table, from CIFAR-100's python version.

The source is CIFAR-100 as its authors distribute it for Python: the folder
``cifar-100-python`` (files ``train``, ``test``, ``meta``) or the archive
``cifar-100-python.tar.gz`` itself. ``train`` and ``test`` are pickled dicts
with ``data`` (uint8 [N, 3072]: 1024 red, 1024 green, 1024 blue values of a
32x32 image, row by row), ``fine_labels`` and ``coarse_labels``; ``meta`` holds
``fine_label_names`` and ``coarse_label_names``. They are read with a
restricted unpickler (``tasks.converters.safe_pickle``) that builds only these containers
and numpy arrays; still, convert only the official files.

Both benchmarks use all 600 images of a class (CIFAR-100's 500 train + 100
test images, in that order) and differ in how classes are split
(``tasks.converters.cifar_splits``, shipped): CIFAR-FS by fine class (64/16/20), FC100
by superclass (12/4/4 superclasses, 60/20/20 classes). A class is named by its
fine label and its group is its split, so
``split: {by: group, train: [train], val: [val], test: [test]}`` selects the
standard split. Classes are stored split by split, each in CIFAR-100's label order.

>>> convert_cifar_fs("cifar-100-python", "cifar-fs.arrow")
Conversion(dest=PosixPath('cifar-fs.arrow'), num_classes=100, num_images=60000, skipped=())
"""

from __future__ import annotations

import tarfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator

import numpy as np

from tasks.converters import safe_pickle
from tasks.converters.cifar_splits import CIFAR_FS, FC100
from tasks.converters.convert import ClassArrays, Conversion, Progress, resize, write_arrays
from tasks.store import DataError
from tasks.store_writer import check_destination

SPLITS = ("train", "val", "test")
FILES = ("meta", "train", "test")


@dataclass(frozen=True)
class Cifar100:
    """CIFAR-100 in memory: train then test images, uint8 [N, 3, 32, 32], with fine and coarse labels."""

    images: np.ndarray
    fine: np.ndarray
    coarse: np.ndarray
    fine_names: list[str]
    coarse_names: list[str]
    where: str

    def superclass(self) -> dict[int, int]:
        """The coarse label of each fine label (read_cifar100 checked there is exactly one)."""
        return dict(zip(self.fine.tolist(), self.coarse.tolist()))


def convert_cifar_fs(src: str | Path, dest: str | Path, *, size: int = 32, min_per_class: int = 1,
                     skip_bad: bool = False, overwrite: bool = False, progress: Progress | None = None) -> Conversion:
    """CIFAR-FS (Bertinetto et al. 2019): CIFAR-100 split 64/16/20 by fine class, into a store at ``dest``."""
    check_destination(Path(dest), overwrite)
    data = read_cifar100(src)
    split_of = _names_to_split(CIFAR_FS, data.fine_names, data, "CIFAR-FS class")
    return _write(data, split_of, dest, "cifar-fs", "CIFAR-FS split of Bertinetto et al. 2019 (64/16/20 classes)",
                  size, min_per_class, skip_bad, overwrite, progress)


def convert_fc100(src: str | Path, dest: str | Path, *, size: int = 32, min_per_class: int = 1,
                  skip_bad: bool = False, overwrite: bool = False, progress: Progress | None = None) -> Conversion:
    """FC100 (Oreshkin et al. 2018): CIFAR-100 split 12/4/4 by superclass, into a store at ``dest``."""
    check_destination(Path(dest), overwrite)
    data = read_cifar100(src)
    coarse_split = _names_to_split(FC100, data.coarse_names, data, "FC100 superclass")
    split_of = {f: coarse_split[c] for f, c in data.superclass().items()}
    return _write(data, split_of, dest, "fc100", "FC100 split of Oreshkin et al. 2018 (12/4/4 superclasses)",
                  size, min_per_class, skip_bad, overwrite, progress)


def read_cifar100(src: str | Path) -> Cifar100:
    """Read and check CIFAR-100's python version (folder or .tar.gz)."""
    with _members(Path(src)) as open_member:
        with open_member("meta") as (f, where):
            meta = safe_pickle.mapping(safe_pickle.load(f, where, "CIFAR-100"), where,
                                       ("fine_label_names", "coarse_label_names"))
            fine_names = safe_pickle.strings(meta["fine_label_names"], f"{where}: fine_label_names")
            coarse_names = safe_pickle.strings(meta["coarse_label_names"], f"{where}: coarse_label_names")
        for key, names, count in (("fine_label_names", fine_names, 100), ("coarse_label_names", coarse_names, 20)):
            if len(names) != count or len(set(names)) != count:
                raise DataError(f"{where}: {key} must be {count} distinct names, found {len(set(names))} of "
                                f"{len(names)}; is this CIFAR-100's python version?")
        parts = []
        for part in ("train", "test"):
            with open_member(part) as (f, where):
                d = safe_pickle.mapping(safe_pickle.load(f, where, "CIFAR-100"), where,
                                        ("data", "fine_labels", "coarse_labels"))
            images = d["data"]
            if not (isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 2
                    and images.shape[1] == 3 * 32 * 32):
                found = (f"{images.dtype} {list(images.shape)}" if isinstance(images, np.ndarray)
                         else type(images).__name__)
                raise DataError(f"{where}: data must be uint8 [N, 3072] (32x32 RGB images), found {found}")
            fine = safe_pickle.integers(d["fine_labels"], f"{where}: fine_labels", len(images), 100)
            coarse = safe_pickle.integers(d["coarse_labels"], f"{where}: coarse_labels", len(images), 20)
            parts.append((images.reshape(-1, 3, 32, 32), fine, coarse))
    data = Cifar100(*(np.concatenate(p) for p in zip(*parts)), fine_names, coarse_names, str(src))
    absent = sorted(set(range(100)) - set(data.fine.tolist()))
    if absent:
        raise DataError(f"{src}: fine labels {absent[:5]}{' ...' if len(absent) > 5 else ''} have no images; "
                        "give the whole CIFAR-100")
    if len(set(zip(data.fine.tolist(), data.coarse.tolist()))) != 100:
        raise DataError(f"{src}: a fine label appears under two coarse labels; the files are not CIFAR-100's")
    return data


def _names_to_split(splits: dict[str, tuple[str, ...]], names: list[str], data: Cifar100,
                    what: str) -> dict[int, str]:
    index = {n: i for i, n in enumerate(names)}
    missing = sorted(n for members in splits.values() for n in members if n not in index)
    if missing:
        raise DataError(f"{data.where}: CIFAR-100's meta lacks the {what} names {missing[:5]}"
                        f"{' ...' if len(missing) > 5 else ''}; is this CIFAR-100's python version?")
    return {index[n]: split for split, members in splits.items() for n in members}


def _write(data: Cifar100, split_of: dict[int, str], dest: str | Path, source: str, split_text: str, size: int,
           min_per_class: int, skip_bad: bool, overwrite: bool, progress: Progress | None) -> Conversion:
    if size < 1:
        raise DataError(f"image size must be >= 1 pixel, got {size}")
    order = np.argsort(data.fine, kind="stable")  # each class's images in file order: train's, then test's
    starts = np.searchsorted(data.fine[order], np.arange(101))
    classes = []
    for split in SPLITS:
        for f in sorted(k for k, s in split_of.items() if s == split):
            rows = order[starts[f]:starts[f + 1]]
            classes.append(ClassArrays(data.fine_names[f], split, len(rows),
                                       lambda rows=rows: resize(data.images[rows], size),
                                       f"fine label {f} of {data.where}"))
    return write_arrays(classes, dest, (3, size, size), source=f"{source}: {data.where}",
                        preprocessing=f"CIFAR-100 RGB, {size}x{size}"
                                      f"{' (bilinear)' if size != 32 else ''}; group = the {split_text}",
                        min_per_class=min_per_class, skip_bad=skip_bad, overwrite=overwrite, progress=progress)


@contextmanager
def _members(src: Path) -> Iterator:
    """``open_member(name)``: a context giving (file, where) for ``meta``/``train``/``test`` of a folder or .tar.gz."""
    hint = "give the cifar-100-python folder (train, test, meta) or cifar-100-python.tar.gz"
    if not src.exists():
        raise DataError(f"CIFAR-100 source {src} does not exist; {hint}")
    if src.is_dir():
        inner = src / "cifar-100-python"
        if not (src / "meta").is_file() and inner.is_dir():
            src = inner

        @contextmanager
        def open_member(name: str) -> Iterator[tuple[IO[bytes], str]]:
            path = src / name
            if not path.is_file():
                raise DataError(f"CIFAR-100 source {src} has no file {name!r}; {hint}")
            with open(path, "rb") as f:
                yield f, str(path)

        yield open_member
        return
    try:
        archive = tarfile.open(src)
    except (tarfile.TarError, OSError) as e:
        raise DataError(f"CIFAR-100 source {src} is neither a folder nor a readable tar archive ({e}); {hint}") \
            from None
    with archive:
        found = {Path(m.name).name: m for m in archive.getmembers() if m.isfile() and Path(m.name).name in FILES}

        @contextmanager
        def open_member(name: str) -> Iterator[tuple[IO[bytes], str]]:
            if name not in found:
                raise DataError(f"CIFAR-100 archive {src} has no file {name!r}; {hint}")
            try:
                f = archive.extractfile(found[name])
            except (tarfile.TarError, OSError) as e:
                raise DataError(f"{src}:{found[name].name} cannot be read ({e}); download the archive again") from None
            with f:
                yield f, f"{src}:{found[name].name}"

        yield open_member
