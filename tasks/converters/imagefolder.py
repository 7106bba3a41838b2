"""Any ImageFolder tree -> an image store.

A source is a folder (or a zip with the same layout at its top level)::

    <root>/<class>/<image>.png|.jpg|.jpeg

one folder per class, named for the class; files of other types are ignored,
and so are hidden files. Images are converted to greyscale (``channels=1``)
or RGB (``channels=3``, the default) and resized to ``size`` x ``size``
(bilinear). Several roots make one store; a class folder name that occurs in
two roots is a duplicate class. Classes have no group (``""``); split them with
``split_classes(store, by="class", ...)``. Classes are stored per root in the
order of the roots, sorted by name within a root.

>>> convert_imagefolder(["flowers"], "flowers.arrow", size=64)
Conversion(dest=PosixPath('flowers.arrow'), num_classes=102, num_images=8189, skipped=())
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Sequence

from tasks.converters.convert import ClassFiles, Conversion, Progress, SourceTree, convert
from tasks.store import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def convert_imagefolder(sources: Sequence[str | Path], dest: str | Path, *, size: int = 84, channels: int = 3,
                        min_per_class: int = 1, skip_bad: bool = False, overwrite: bool = False,
                        progress: Progress | None = None) -> Conversion:
    """Convert ImageFolder tree(s) into one store at ``dest`` (``channels`` 1 = greyscale, 3 = RGB)."""
    if channels not in (1, 3):
        raise DataError(f"channels must be 1 (greyscale) or 3 (RGB), got {channels}")
    if size < 1:
        raise DataError(f"image size must be >= 1 pixel, got {size}")
    mode = "L" if channels == 1 else "RGB"
    return convert(
        imagefolder_classes(sources), dest, mode=mode, size=(size, size),
        source="imagefolder: " + ", ".join(Path(s).name for s in sources),
        preprocessing=f"{'greyscale' if channels == 1 else 'RGB'}, resized to {size}x{size} (bilinear)",
        min_per_class=min_per_class, skip_bad=skip_bad, overwrite=overwrite, progress=progress,
    )


def imagefolder_classes(sources: Sequence[str | Path]) -> list[ClassFiles]:
    """One class per class folder of each root, with its images sorted by file name."""
    if not sources:
        raise DataError("no ImageFolder source given; pass a folder laid out as <root>/<class>/<image>.png")
    classes = []
    for src in sources:
        tree = SourceTree(src, "ImageFolder")
        images = [f for f in tree.files if f.lower().endswith(IMAGE_SUFFIXES)]
        stray = next((f for f in images if f.count("/") != 1), None)
        nested = next((d for d in tree.dirs if d.count("/") >= 1), None)
        if stray is not None or nested is not None:
            what = f"image {stray}" if stray is not None else f"folder {nested}"
            raise DataError(f"{tree.path} is not in the ImageFolder layout: {what} is not directly inside a class "
                            "folder (expected <root>/<class>/<image>.png); for Omniglot use `data convert omniglot`")
        class_dirs = [d for d in tree.dirs if "/" not in d]
        if not class_dirs:
            raise DataError(f"{tree.path} is not in the ImageFolder layout: it has no class folders "
                            "(expected <root>/<class>/<image>.png)")
        by_class: dict[str, list[str]] = defaultdict(list)
        for f in images:
            by_class[f.split("/", 1)[0]].append(f)
        for d in class_dirs:
            classes.append(ClassFiles(d, "", tuple(tree.ref(f) for f in by_class[d]), str(tree.ref(d))))
    return classes
