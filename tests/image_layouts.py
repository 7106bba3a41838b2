"""Tiny datasets in the real on-disk layouts (Omniglot, miniImageNet, ImageFolder), written with PIL for tests.

Every image is random (seeded), so a mix-up of two images or classes shows up
as a pixel mismatch. ``expected_pixels`` is the reference preprocessing the
converters promise, written out independently with PIL.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
from PIL import Image


def write_image(path: Path, rng: np.random.Generator, size: tuple[int, int] = (20, 20), mode: str = "RGB") -> Path:
    """A random image of ``size`` = (width, height); mode "1" is black-and-white like the Omniglot PNGs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    if mode == "1":
        img = Image.fromarray(rng.random((h, w)) > 0.2)  # mostly white, black strokes
    elif mode == "L":
        img = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L")
    else:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
    img.save(path)
    return path


def expected_pixels(path: Path, mode: str, size: int, invert: bool = False) -> np.ndarray:
    """What a store must hold for ``path``: uint8 [C, size, size]."""
    img = Image.open(path).convert(mode).resize((size, size), Image.Resampling.BILINEAR)
    a = np.asarray(img, dtype=np.uint8)
    a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
    return 255 - a if invert else a


def omniglot_folder(root: Path, alphabets: dict[str, int], drawings: int = 4, set_name: str = "images_background",
                    seed: int = 0, first_id: int = 1) -> Path:
    """``root/<set_name>/<alphabet>/characterNN/<id>_<drawer>.png``; returns the set folder."""
    rng = np.random.default_rng(seed)
    folder, char_id = root / set_name, first_id
    for alphabet, characters in alphabets.items():
        for c in range(1, characters + 1):
            for d in range(1, drawings + 1):
                write_image(folder / alphabet / f"character{c:02d}" / f"{char_id:04d}_{d:02d}.png", rng, (21, 21), "1")
            char_id += 1
    return folder


def zip_folder(folder: Path, zip_path: Path) -> Path:
    """Zip ``folder`` with its own name as the top-level entry, directory entries included (like the official zips)."""
    with zipfile.ZipFile(zip_path, "w") as z:
        z.write(folder, folder.name + "/")
        for p in sorted(folder.rglob("*")):
            z.write(p, f"{folder.name}/{p.relative_to(folder).as_posix()}" + ("/" if p.is_dir() else ""))
    return zip_path


def miniimagenet_folder(root: Path, splits: dict[str, list[str]], per_class: int = 4, seed: int = 0) -> Path:
    """``root/{train,val,test}.csv`` ("filename,label") + ``root/images/``; jpg and png mixed."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "images").mkdir(exist_ok=True)
    for split, labels in splits.items():
        lines = ["filename,label"]
        for label in labels:
            for i in range(per_class):
                name = f"{label}{i:08d}.{'jpg' if i % 2 else 'png'}"
                write_image(root / "images" / name, rng, (30, 24), "RGB")
                lines.append(f"{name},{label}")
        (root / f"{split}.csv").write_text("\n".join(lines) + "\n")
    return root


def imagefolder(root: Path, classes: dict[str, int], mode: str = "RGB", seed: int = 0) -> Path:
    """``root/<class>/<i>.png|.jpg``."""
    rng = np.random.default_rng(seed)
    for name, count in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            write_image(root / name / f"{i:03d}.{'jpeg' if i == 1 else 'png'}", rng, (18, 26), mode)
    return root


def leftovers(dest: Path) -> list[str]:
    """Anything a failed conversion left beside ``dest``: the store, its skip list, or a temp folder."""
    return sorted(p.name for p in dest.parent.iterdir() if p.name.startswith((dest.name, f".{dest.name}")))
