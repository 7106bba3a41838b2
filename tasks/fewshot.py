"""N-way K-shot few-shot classification episodes from an image store (a ``TaskSource``).

An episode draws ``n_way`` classes from the split's classes and, from each,
``k_shot + query`` distinct images: the first ``k_shot`` form the support set,
the rest the query set. The i-th chosen class gets label i, and the choice is
in random order, so the class -> label map is a fresh random permutation per
episode (a learner cannot memorise "class 7 is label 2"). Within each set,
examples are ordered by label: label 0's k_shot images, then label 1's, ...

    support_x [T, n_way*k_shot, C, H, W] float32 in [0, 1]    support_y [T, n_way*k_shot] int64 in [0, n_way)
    query_x   [T, n_way*query,  C, H, W] float32 in [0, 1]    query_y   [T, n_way*query]  int64

Episode i of a step is a function of its id only (``episode_rng``), so any
worker holding the same store file draws the same episode bit for bit. Only
the images an episode uses are copied out of the memory-mapped store.

``rotations=True`` is the Omniglot augmentation of Santoro et al. / Finn et
al.: each class c yields four classes, c rotated by 0, 90, 180 and 270
degrees, drawn independently (two rotations of one character can be two
different labels of one episode).

>>> store = ImageStore.open("omniglot.arrow")
>>> splits = split_classes(store, by="group", train=0.7, val=0.1, test=0.2, seed=0)
>>> tasks = FewShotTasks(store, n_way=5, k_shot=1, query=15, classes=splits.train, rotations=True)
>>> tuple(tasks.sample(EpisodeIds(seed=0, step=0, indices=(0, 1))).support_x.shape)
(2, 5, 1, 28, 28)
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from tasks.episode import EpisodeBatch, EpisodeIds, episode_rng
from tasks.store import DataError, ImageStore


class FewShotTasks:
    """Seed-addressed N-way K-shot episodes over the classes ``classes`` (store class indices) of ``store``."""

    def __init__(self, store: ImageStore | str | Path, n_way: int, k_shot: int, query: int,
                 classes: Sequence[int], rotations: bool = False) -> None:
        self.store = store if isinstance(store, ImageStore) else ImageStore.open(store)
        self.n_way, self.k_shot, self.query, self.rotations = n_way, k_shot, query, rotations
        self.classes: tuple[int, ...] = tuple(int(c) for c in classes)
        for name, value in (("n_way", n_way), ("k_shot", k_shot), ("query", query)):
            if value < 1:
                raise DataError(f"{name} must be >= 1, got {value}")
        if not self.classes:
            raise DataError(f"no classes given for the episodes of {self.store.path}; pass the split's class indices")
        bad = sorted({c for c in self.classes if not 0 <= c < self.store.num_classes})
        if bad:
            raise DataError(f"class indices {bad[:5]} are out of range for {self.store.path} "
                            f"({self.store.num_classes} classes)")
        if len(set(self.classes)) != len(self.classes):
            raise DataError("the classes of a split must be distinct; a class index is listed twice")
        _, h, w = self.store.image_shape
        if rotations and h != w:
            raise DataError(f"rotations need square images, {self.store.path} holds {h}x{w}; set rotations=False")
        if n_way > self.num_classes:
            extra = " with rotations" if rotations else ""
            raise DataError(f"n_way={n_way} is more than the {self.num_classes} classes{extra} this split has; "
                            "lower n_way or give the split more classes")
        smallest = min(self.classes, key=self.store.count)
        if k_shot + query > self.store.count(smallest):
            raise DataError(f"k_shot + query = {k_shot + query} images per class, but class "
                            f"{self.store.class_names[smallest]!r} has only {self.store.count(smallest)}; "
                            "lower k_shot or query, or leave that class out of the split")
        self._labels_s = np.repeat(np.arange(n_way, dtype=np.int64), k_shot)
        self._labels_q = np.repeat(np.arange(n_way, dtype=np.int64), query)

    @property
    def num_classes(self) -> int:
        """Classes episodes are drawn from: the split's classes, times 4 with rotations."""
        return len(self.classes) * (4 if self.rotations else 1)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.store.image_shape

    def sample(self, ids: EpisodeIds) -> EpisodeBatch:
        support, query = zip(*(self._episode(ids, i) for i in ids.indices))
        t = len(ids.indices)
        return EpisodeBatch(
            torch.from_numpy(np.stack(support)),
            torch.from_numpy(np.broadcast_to(self._labels_s, (t, len(self._labels_s))).copy()),
            torch.from_numpy(np.stack(query)),
            torch.from_numpy(np.broadcast_to(self._labels_q, (t, len(self._labels_q))).copy()),
        )

    def episode_classes(self, ids: EpisodeIds, index: int) -> list[tuple[int, int]]:
        """(store class index, rotation in quarter turns) of each label 0..n_way-1 of episode ``index``."""
        return self._choose(episode_rng(ids.seed, ids.step, index, ids.purpose))

    def _choose(self, rng: np.random.Generator) -> list[tuple[int, int]]:
        # choice without replacement returns the classes in random order: label i is the i-th drawn.
        drawn = rng.choice(self.num_classes, size=self.n_way, replace=False)
        if self.rotations:
            return [(self.classes[v // 4], int(v % 4)) for v in drawn]
        return [(self.classes[v], 0) for v in drawn]

    def _episode(self, ids: EpisodeIds, index: int) -> tuple[np.ndarray, np.ndarray]:
        rng = episode_rng(ids.seed, ids.step, index, ids.purpose)
        support, query = [], []
        for c, quarter_turns in self._choose(rng):
            images = self.store.images(c)
            picked = images[rng.choice(len(images), size=self.k_shot + self.query, replace=False)]
            if quarter_turns:
                picked = np.rot90(picked, k=quarter_turns, axes=(2, 3))
            support.append(picked[: self.k_shot])
            query.append(picked[self.k_shot:])
        return _to_unit(np.concatenate(support)), _to_unit(np.concatenate(query))

    def __repr__(self) -> str:
        return (f"FewShotTasks({self.n_way}-way {self.k_shot}-shot {self.query}-query over {len(self.classes)} "
                f"classes{' x4 rotations' if self.rotations else ''} of {self.store!r})")


def _to_unit(pixels: np.ndarray) -> np.ndarray:
    return pixels.astype(np.float32) / np.float32(255)
