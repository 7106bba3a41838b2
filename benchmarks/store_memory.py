"""Memory of Ray workers that share one memory-mapped image store: 1 vs 2 actors.

Each actor opens the store, samples episodes and then reads every pixel once
(the worst case: a long run touches the whole dataset). Reported per actor,
from /proc (Linux):

    anon+    growth of private memory (RssAnon) from opening the store on: what each
             worker pays for itself; a per-worker copy of the dataset would show here
    map rss  resident pages of the store's mapping (file-backed, in the shared page cache)
    map pss  the mapping's proportional share: the pages divided among the processes
             that map them, so with 2 actors each is charged about half the store

A last row has one actor copy the whole store into its own memory, for comparison.

    python benchmarks/store_memory.py --store omniglot.arrow
    python benchmarks/store_memory.py --omniglot images_background_small1.zip images_background_small2.zip \\
        --out /tmp/omniglot-small.arrow [--size 28]
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import ray

from tasks.converters.omniglot import convert_omniglot
from tasks.store import ImageStore

MB = 1024 * 1024


def memory(store_path: str) -> dict[str, float]:
    """This process's RssAnon/RssFile (MB) and the Rss/Pss (MB) of its mapping of ``store_path``."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) / 1024
    out["map_rss"] = out["map_pss"] = 0.0
    in_store = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:  # a mapping header: address perms offset dev inode [path]
            in_store = len(fields) >= 6 and fields[5] == store_path
        elif in_store and fields[0] in ("Rss:", "Pss:"):
            out["map_" + fields[0][:-1].lower()] += int(fields[1]) / 1024
    return out


@ray.remote
class StoreReader:
    """A worker that maps the store like a training worker does (imports done in the constructor)."""

    def __init__(self, path: str) -> None:
        import torch  # noqa: F401  (a real worker has torch loaded before it opens its data)

        from tasks.fewshot import FewShotTasks

        self.path, self.make_tasks, self.keep = path, FewShotTasks, None

    def memory(self) -> dict[str, float]:
        return memory(self.path)

    def open_and_sample(self, episodes: int) -> dict[str, float]:
        from tasks.episode import EpisodeIds

        store = ImageStore.open(self.path)
        tasks = self.make_tasks(store, n_way=5, k_shot=1, query=15, classes=range(store.num_classes), rotations=True)
        for step in range(episodes // 25):
            tasks.sample(EpisodeIds(seed=0, step=step, indices=tuple(range(25))))
        checksum = sum(int(store.images(c).sum(dtype=np.uint64)) for c in range(store.num_classes))  # touch all
        self.keep = (tasks, checksum)
        return memory(self.path)

    def copy_all(self) -> dict[str, float]:
        store = ImageStore.open(self.path)
        self.keep = [np.array(store.images(c)) for c in range(store.num_classes)]
        return memory(self.path)


def run(path: str, n: int, episodes: int, copy: bool = False) -> list[dict[str, float]]:
    actors = [StoreReader.options(num_cpus=1).remote(path) for _ in range(n)]
    before = ray.get([a.memory.remote() for a in actors])
    after = ray.get([a.copy_all.remote() if copy else a.open_and_sample.remote(episodes) for a in actors])
    for a in actors:
        ray.kill(a)
    return [{"after": m, "anon_growth": m["RssAnon"] - b["RssAnon"]} for b, m in zip(before, after)]


def describe(path: str) -> str:
    store = ImageStore.open(path)
    c, h, w = store.image_shape
    return (f"store {path}: {store.num_classes} classes, {store.num_images} images {c}x{h}x{w}, "
            f"{store.nbytes / MB:.1f} MB file, {store.num_images * c * h * w / MB:.1f} MB of pixels")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", help="an existing store file")
    ap.add_argument("--omniglot", nargs="+", help="Omniglot zips/folders to convert first (into --out)")
    ap.add_argument("--out", help="where to write the converted store")
    ap.add_argument("--size", type=int, default=28)
    ap.add_argument("--episodes", type=int, default=500)
    args = ap.parse_args()
    if args.omniglot:
        if not args.out:
            ap.error("--omniglot needs --out")
        start = time.perf_counter()
        done = convert_omniglot(args.omniglot, args.out, size=args.size, overwrite=True)
        print(f"converted {len(args.omniglot)} sources: {done.num_classes} classes, {done.num_images} images "
              f"in {time.perf_counter() - start:.2f}s")
        args.store = args.out
    if not args.store:
        ap.error("give --store or --omniglot ... --out")
    path = str(Path(args.store).resolve())
    print(describe(path))  # the driver's map is closed again, so Pss is shared among the actors only
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, _node_ip_address="127.0.0.1")
    print(f"{'workers':>8} {'actor':>5} {'anon+ MB':>9} {'map rss MB':>11} {'map pss MB':>11} {'VmRSS MB':>9}")
    for label, n, copy in (("1", 1, False), ("2", 2, False), ("1 copy", 1, True)):
        for i, r in enumerate(run(path, n, args.episodes, copy)):
            m = r["after"]
            print(f"{label:>8} {i:>5} {r['anon_growth']:9.1f} {m['map_rss']:11.1f} {m['map_pss']:11.1f} "
                  f"{m['VmRSS']:9.1f}")
    ray.shutdown()


if __name__ == "__main__":
    main()
