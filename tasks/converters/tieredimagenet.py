"""tieredImageNet (Ren et al. 2018) from its pickles -> an image store.

The source is the folder of the dataset's release (``tiered-imagenet``), per split (``train``, ``val``,
``test``)::

    {split}_images_png.pkl   a list of PNG-encoded images, each a uint8 numpy array (cv2.imencode's output)
    {split}_labels.pkl       a dict: label_specific [N] (class index), label_general [N] (superclass index),
                             label_specific_str (class names, WordNet ids), label_general_str (superclass names)

The release is already split by superclass (``label_general``: 20 / 6 / 8 superclasses, 351 / 97 / 160
classes), so a class's group is its split file, and ``split: {by: group, train: [train], val: [val], test:
[test]}`` selects the standard split. A class is named by its WordNet id. The pickles are read with a
restricted unpickler (``tasks.converters.safe_pickle``) that builds only containers and numpy arrays; still, convert only
the official files. One split's images are in memory at a time; PNGs are decoded with Pillow (RGB, as stored)
and resized to ``size`` (default 84, their size).

>>> convert_tieredimagenet("tiered-imagenet", "tiered.arrow")
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.converters import safe_pickle
from tasks.converters.convert import UNREADABLE, ClassArrays, Conversion, Progress, decode, error_reason, write_arrays
from tasks.store import DataError
from tasks.store_writer import check_destination

SPLITS = ("train", "val", "test")
LABEL_KEYS = ("label_specific", "label_general", "label_specific_str", "label_general_str")


@dataclass(frozen=True)
class SplitLabels:
    split: str
    specific: np.ndarray
    names: list[str]
    where: str


def convert_tieredimagenet(src: str | Path, dest: str | Path, *, size: int = 84, min_per_class: int = 1,
                           skip_bad: bool = False, overwrite: bool = False,
                           progress: Progress | None = None) -> Conversion:
    """Convert the tieredImageNet pickles in the folder ``src`` into one store at ``dest``."""
    if size < 1:
        raise DataError(f"image size must be >= 1 pixel, got {size}")
    check_destination(Path(dest), overwrite)
    folder = _folder(Path(src))
    labels = [_labels(folder, split) for split in SPLITS]
    seen: dict[str, str] = {}
    for s in labels:
        for name in s.names:
            if seen.setdefault(name, s.split) != s.split:
                raise DataError(f"class {name!r} is in both {seen[name]} and {s.split} of {folder}; the splits "
                                "must not share classes")
    images = _Images(folder)
    classes = []
    for s in labels:
        order = np.argsort(s.specific, kind="stable")
        starts = np.searchsorted(s.specific[order], np.arange(len(s.names) + 1))
        for k, name in enumerate(s.names):
            rows = order[starts[k]:starts[k + 1]]
            classes.append(ClassArrays(name, s.split, len(rows),
                                       lambda s=s, rows=rows, name=name: images.decoded(s, rows, name, size),
                                       f"class {k} of {s.where}"))
    return write_arrays(classes, dest, (3, size, size), source=f"tieredimagenet: {folder}",
                        preprocessing=f"RGB PNG decoded, {size}x{size}{' (bilinear)' if size != 84 else ''}; "
                                      "group = the split file (train/val/test), split by superclass",
                        min_per_class=min_per_class, skip_bad=skip_bad, overwrite=overwrite, progress=progress)


def _folder(src: Path) -> Path:
    hint = ("give the tiered-imagenet folder holding {train,val,test}_images_png.pkl and "
            "{train,val,test}_labels.pkl")
    if not src.is_dir():
        raise DataError(f"tieredImageNet source {src} {'is a file, not a folder' if src.exists() else 'does not exist'}"
                        f"; {hint}")
    if not (src / "train_labels.pkl").exists() and (src / "tiered-imagenet").is_dir():
        src = src / "tiered-imagenet"
    missing = [f"{s}_{kind}.pkl" for s in SPLITS for kind in ("images_png", "labels")
               if not (src / f"{s}_{kind}.pkl").is_file()]
    if missing:
        raise DataError(f"tieredImageNet source {src} has no {', '.join(missing)}; {hint}")
    return src


def _labels(folder: Path, split: str) -> SplitLabels:
    path = folder / f"{split}_labels.pkl"
    with open(path, "rb") as f:
        d = safe_pickle.mapping(safe_pickle.load(f, str(path), "tieredImageNet labels"), str(path), LABEL_KEYS)
    names = safe_pickle.strings(d["label_specific_str"], f"{path}: label_specific_str")
    general_names = safe_pickle.strings(d["label_general_str"], f"{path}: label_general_str")
    if not isinstance(d["label_specific"], (list, tuple, np.ndarray)):
        raise DataError(f"{path}: label_specific must be a list of class indices, found "
                        f"{type(d['label_specific']).__name__}")
    n = len(d["label_specific"])
    specific = safe_pickle.integers(d["label_specific"], f"{path}: label_specific", n, len(names))
    general = safe_pickle.integers(d["label_general"], f"{path}: label_general", n, len(general_names))
    if len(set(names)) != len(names):
        raise DataError(f"{path}: label_specific_str repeats a class name")
    if len(set(zip(specific.tolist(), general.tolist()))) != len(set(specific.tolist())):
        raise DataError(f"{path}: a class appears under two superclasses (label_general); the file is damaged")
    return SplitLabels(split, specific, names, str(path))


class _Images:
    """The PNGs of one split at a time, loaded on first use (a split of tieredImageNet is gigabytes)."""

    def __init__(self, folder: Path) -> None:
        self.folder, self._split, self._items = folder, None, None

    def decoded(self, labels: SplitLabels, rows: np.ndarray, name: str, size: int) -> np.ndarray:
        items = self._load(labels)
        out = np.empty((len(rows), 3, size, size), dtype=np.uint8)
        for i, row in enumerate(rows.tolist()):
            item = items[row]
            try:
                if not (isinstance(item, np.ndarray) and item.dtype == np.uint8):
                    raise ValueError(f"an encoded image is a uint8 array, found {type(item).__name__}")
                out[i] = decode(item.tobytes(), "RGB", (size, size))
            except UNREADABLE as e:
                raise DataError(f"image {row} of {self.folder / f'{labels.split}_images_png.pkl'} (class {name!r}) "
                                f"cannot be decoded: {error_reason(e)}; download the dataset again") from None
        return out

    def _load(self, labels: SplitLabels) -> list:
        if self._split != labels.split:
            self._items = None  # drop the previous split before reading the next
            path = self.folder / f"{labels.split}_images_png.pkl"
            with open(path, "rb") as f:
                items = safe_pickle.load(f, str(path), "tieredImageNet images")
            if not isinstance(items, (list, tuple, np.ndarray)) or len(items) != len(labels.specific):
                found = f"{len(items)} items" if isinstance(items, (list, tuple, np.ndarray)) else type(items).__name__
                raise DataError(f"{path}: expected a list of {len(labels.specific)} encoded images (one per label of "
                                f"{labels.where}), found {found}")
            self._split, self._items = labels.split, items
        return self._items
