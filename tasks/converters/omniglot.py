"""Omniglot (Lake et al. 2015) in its official layout -> an image store.

A source is one of the official zips or its unpacked folder, e.g.
``images_background.zip``, ``images_evaluation/``, ``images_background_small1.zip``:
``[<set>/]<alphabet>/<character>/<drawing>.png`` with 20 drawings per character.
Several sources make one store (e.g. small1 + small2, or background +
evaluation). A class is one character, named ``"<alphabet>/<character>"``
(unique across alphabets, e.g. ``"Greek/character01"``); its group is the
alphabet, so splits can be made by alphabet (``tasks.splits``).

The same character can come from two sources: the minimal splits
``images_background_small1`` and ``..._small2`` both hold Greek and Latin, with
the same files. Drawings are merged by file name; an identical file is kept
once, two different files with the same name are an error.

Pixel convention: the PNGs are black strokes on white. Images are converted
to greyscale, resized to ``size`` x ``size`` (bilinear, default 28) and then
INVERTED, so strokes are 255 (1.0 once scaled to [0, 1]) and the background
is 0, as in most few-shot code. Classes are stored sorted by name, so the
store does not depend on the order the sources are given in.

>>> convert_omniglot(["images_background_small1.zip", "images_background_small2.zip"], "omniglot-small.arrow")
Conversion(dest=PosixPath('omniglot-small.arrow'), num_classes=242, num_images=4840, skipped=())
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Sequence

from tasks.converters.convert import ClassFiles, Conversion, FileReader, ImageRef, Progress, SourceTree, convert
from tasks.store import DataError

_LAYOUT = "[<set>/]<alphabet>/<character>/<drawing>.png"


def convert_omniglot(sources: Sequence[str | Path], dest: str | Path, *, size: int = 28, min_per_class: int = 1,
                     skip_bad: bool = False, overwrite: bool = False, progress: Progress | None = None) -> Conversion:
    """Convert Omniglot zips/folders into one store at ``dest`` (28x28 greyscale, strokes = 255)."""
    if size < 1:
        raise DataError(f"image size must be >= 1 pixel, got {size}")
    return convert(
        omniglot_classes(sources), dest, mode="L", size=(size, size), invert=True,
        source="omniglot: " + ", ".join(Path(s).name for s in sources),
        preprocessing=f"greyscale, resized to {size}x{size} (bilinear), inverted: strokes 255, background 0",
        min_per_class=min_per_class, skip_bad=skip_bad, overwrite=overwrite, progress=progress,
    )


def omniglot_classes(sources: Sequence[str | Path]) -> list[ClassFiles]:
    """The characters of all ``sources``, merged by name and sorted; each one's drawings sorted by file name."""
    if not sources:
        raise DataError("no Omniglot source given; pass e.g. images_background.zip")
    drawings: dict[str, dict[str, ImageRef]] = defaultdict(dict)
    group, where = {}, {}
    with FileReader() as reader:
        for src in sources:
            for alphabet, character, folder, refs in _characters(SourceTree(src, "Omniglot")):
                name = f"{alphabet}/{character}"
                group[name] = alphabet
                where.setdefault(name, folder)
                mine = drawings[name]
                for ref in refs:
                    file = ref.member.rsplit("/", 1)[1]
                    if file in mine and reader.read(mine[file]) != reader.read(ref):
                        raise DataError(f"{mine[file]} and {ref} are both drawing {file} of {name!r} but differ; "
                                        "convert these sources into separate stores")
                    mine.setdefault(file, ref)
    return [ClassFiles(name, group[name], tuple(drawings[name][f] for f in sorted(drawings[name])), where[name])
            for name in sorted(drawings)]


def _characters(tree: SourceTree) -> list[tuple[str, str, str, list[ImageRef]]]:
    """(alphabet, character, where, drawings) of one source; empty character folders included."""
    pngs = [f for f in tree.files if f.lower().endswith(".png")]
    if not pngs:
        raise DataError(f"{tree.path} is not in the Omniglot layout: no {_LAYOUT} inside; pass an official zip "
                        "such as images_background.zip, or its unpacked folder")
    depths = [f.count("/") + 1 for f in pngs]
    depth = max(set(depths), key=depths.count)
    odd = next((f for f, d in zip(pngs, depths) if d != depth or d not in (3, 4)), None)
    if odd is not None:
        raise DataError(f"{tree.path} is not in the Omniglot layout: {odd} is not at {_LAYOUT}; pass an official "
                        "zip or its unpacked folder, not a folder above or below it")
    by_folder: dict[str, list[ImageRef]] = defaultdict(list)
    for f in pngs:
        by_folder[f.rsplit("/", 1)[0]].append(tree.ref(f))
    folders = [d for d in tree.dirs if d.count("/") + 1 == depth - 1]
    out = []
    for folder in folders:
        alphabet, character = folder.split("/")[-2:]
        out.append((alphabet, character, str(tree.ref(folder)), by_folder.get(folder, [])))
    return out
