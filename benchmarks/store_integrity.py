"""What the image store's integrity checks cost: the per-class check at first read, and a full ``verify``.

Every class of a (format 2) store carries the CRC-32 of its pixels, checked the first time a process reads that
class; ``metaray data verify`` re-hashes everything (class CRCs and the sha256 content hash). Reported, per
store, with the file in the page cache (a cold read adds the disk's time, the same with or without checks):

    open ms          ImageStore.open: footer, index, batch headers (no pixels)
    1st read ms      reading every class once: the checks (the cost a worker pays over a run, once per class)
    2nd read ms      reading every class again: no checks left (views into the map)
    per class ms     the first-read cost of one class
    verify s, MB/s   the full re-hash

The stores are synthetic with the real shapes: Omniglot (1623 characters x 20 drawings, 28x28 greyscale) and
a 20-class slice of miniImageNet (600 images each, 84x84 RGB; the full 100 classes are 5x that).

    python benchmarks/store_integrity.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from tasks.store import ImageStore
from tasks.store_writer import StoreWriter

STORES = [  # name, classes, images per class, shape
    ("omniglot", 1623, 20, (1, 28, 28)),
    ("miniimagenet x20 classes", 20, 600, (3, 84, 84)),
]


def write(path: Path, classes: int, per_class: int, shape: tuple[int, int, int]) -> Path:
    rng = np.random.default_rng(0)
    with StoreWriter(path, shape, source="synthetic", preprocessing="random") as w:
        for c in range(classes):
            w.add_class(f"class{c:04d}", f"group{c // 20}", rng.integers(0, 256, (per_class, *shape), dtype=np.uint8))
    return path


def read_all(store: ImageStore) -> float:
    start = time.perf_counter()
    for c in range(store.num_classes):
        store.images(c)
    return time.perf_counter() - start


def main() -> None:
    print(f"{'store':<26} {'MB':>7} {'open ms':>8} {'1st read ms':>12} {'2nd read ms':>12} {'per class ms':>13} "
          f"{'verify s':>9} {'MB/s':>6}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, classes, per_class, shape in STORES:
            path = write(Path(tmp) / f"{name.split()[0]}.arrow", classes, per_class, shape)
            path.read_bytes()  # into the page cache
            start = time.perf_counter()
            store = ImageStore.open(path)
            opened = time.perf_counter() - start
            first, second = read_all(store), read_all(store)
            start = time.perf_counter()
            ImageStore.open(path).verify()
            verify = time.perf_counter() - start
            mb = store.nbytes / 2**20
            print(f"{name:<26} {mb:7.1f} {opened * 1e3:8.1f} {first * 1e3:12.1f} {second * 1e3:12.2f} "
                  f"{first * 1e3 / classes:13.3f} {verify:9.2f} {mb / verify:6.0f}")
            path.unlink()


if __name__ == "__main__":
    main()
