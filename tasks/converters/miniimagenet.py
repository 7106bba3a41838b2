"""miniImageNet (Vinyals et al. 2016) in the Ravi & Larochelle layout -> an image store.

A source is a folder (or a zip with the same files at its top level)::

    train.csv  val.csv  test.csv      header "filename,label", e.g. "n0153282900000005.jpg,n01532829"
    images/<filename>

A class is one label (a WordNet id such as ``n01532829``); its group is the
name of the csv that lists it (``train``, ``val`` or ``test``), so the official
class split is kept in the store: ``split_classes(store, by="group",
train=["train"], val=["val"], test=["test"])`` gives it back. A label listed in
two csv files is a duplicate class (an error: the splits would overlap).
Images are converted to RGB and resized to ``size`` x ``size`` (bilinear,
default 84), in csv order.

>>> convert_miniimagenet(["mini-imagenet"], "miniimagenet.arrow")
Conversion(dest=PosixPath('miniimagenet.arrow'), num_classes=100, num_images=60000, skipped=())
"""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from pathlib import Path
from typing import Sequence

from tasks.converters.convert import ClassFiles, Conversion, FileReader, Progress, SourceTree, convert
from tasks.store import DataError

SPLITS = ("train", "val", "test")


def convert_miniimagenet(sources: Sequence[str | Path], dest: str | Path, *, size: int = 84,
                         min_per_class: int = 1, skip_bad: bool = False, overwrite: bool = False,
                         progress: Progress | None = None) -> Conversion:
    """Convert Ravi & Larochelle miniImageNet folder(s) into one store at ``dest`` (84x84 RGB)."""
    if size < 1:
        raise DataError(f"image size must be >= 1 pixel, got {size}")
    return convert(
        miniimagenet_classes(sources), dest, mode="RGB", size=(size, size),
        source="miniimagenet: " + ", ".join(Path(s).name for s in sources),
        preprocessing=f"RGB, resized to {size}x{size} (bilinear); group = the csv split (train/val/test)",
        min_per_class=min_per_class, skip_bad=skip_bad, overwrite=overwrite, progress=progress,
    )


def miniimagenet_classes(sources: Sequence[str | Path]) -> list[ClassFiles]:
    """The labels of every source's train/val/test csv, in that order, each with its images in csv order."""
    if not sources:
        raise DataError("no miniImageNet source given; pass the folder holding train.csv, val.csv, test.csv, images/")
    classes = []
    for src in sources:
        tree = SourceTree(src, "miniImageNet")
        missing = [f"{s}.csv" for s in SPLITS if f"{s}.csv" not in tree.files]
        if "images" not in tree.dirs:
            missing.append("images/")
        if missing:
            raise DataError(f"{tree.path} is not in the miniImageNet (Ravi & Larochelle) layout: it has no "
                            f"{', '.join(missing)}; pass the folder holding train.csv, val.csv, test.csv and images/")
        with FileReader() as reader:
            for split in SPLITS:
                for label, files in _read_csv(tree, f"{split}.csv", reader).items():
                    refs = tuple(tree.ref(f"images/{f}") for f in files)
                    classes.append(ClassFiles(label, split, refs, str(tree.ref(f"{split}.csv"))))
    return classes


def _read_csv(tree: SourceTree, name: str, reader: FileReader) -> dict[str, list[str]]:
    where = tree.ref(name)
    try:
        rows = list(csv.reader(io.StringIO(reader.read(where).decode("utf-8-sig"))))
    except (UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{where} is not a readable csv ({e}); restore it from the dataset") from None
    if not rows or [c.strip() for c in rows[0]] != ["filename", "label"]:
        found = ",".join(rows[0]) if rows else "an empty file"
        raise DataError(f"{where} must start with the header 'filename,label', found {found!r}")
    files: dict[str, list[str]] = defaultdict(list)
    for line, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            raise DataError(f"{where} line {line}: expected 'filename,label', found {','.join(row)!r}")
        files[row[1].strip()].append(row[0].strip())
    if not files:
        raise DataError(f"{where} lists no images; restore it from the dataset")
    return dict(files)
