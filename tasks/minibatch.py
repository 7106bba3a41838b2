"""Seed-addressed minibatches of a split's images with their split-global labels (a ``TaskSource``): the training
data of pre-training, where each "task" of a meta-step is one batch of images.

The split's classes are numbered 0..n-1 in the order given (with ``rotations``, class c at p quarter turns is
label 4c + p, four classes per character as in the episodes). Its images (times 4 with rotations) form a pool of
N items, and training walks through the pool in epochs: epoch e is a permutation of the pool drawn from
``episode_rng(seed, e, 0, purpose)``, and batch ``index`` of step ``step`` holds the ``images`` items at
positions ``(step * per_step + index) * images + 0..images-1`` of the concatenated epochs (``per_step``: batches
per step, the meta-batch size). Every item is seen once per epoch, and a batch is a function of its id only: any
worker draws the same bytes, alone or in a share, and a resumed run draws the same batches.

A batch is an ``EpisodeBatch`` with the images and labels as its support set and an empty query set::

    support_x [T, images, C, H, W] float32 in [0, 1]    support_y [T, images] int64 in [0, num_classes)
    query_x   [T, 0, C, H, W]                           query_y   [T, 0]

``augment`` distorts each batch with its own augmentation generator (``stream=AUGMENT``), drawn apart from the
sampling, as for episodes.

>>> batches = ImageBatches(store, classes=splits.train, images=16, per_step=4, rotations=True)
>>> b = batches.sample(EpisodeIds(seed=0, step=0, indices=(0, 1, 2, 3), purpose=Purpose.BATCH))
>>> tuple(b.support_x.shape), batches.num_classes
((4, 16, 1, 28, 28), 968)
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from tasks.augment import Augment, concat_draws
from tasks.episode import AUGMENT, EpisodeBatch, EpisodeIds, episode_rng
from tasks.store import DataError, ImageStore


class ImageBatches:
    """Batches of ``images`` images of the classes ``classes`` (store class indices) with their split-global labels."""

    def __init__(self, store: ImageStore, classes: Sequence[int], images: int, per_step: int, rotations: bool = False,
                 augment: Augment | None = None, where: str = "the train split", key: str = "images") -> None:
        self.store, self.classes, self.rotations = store, tuple(int(c) for c in classes), rotations
        self.images, self.per_step = images, per_step
        self.augment = augment if augment else None
        if not self.classes:
            raise DataError(f"no classes in {where} of {store.path}; give the split classes (task.split.train)")
        counts = np.asarray([store.count(c) for c in self.classes], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(counts)])  # image j of the split: class searchsorted(j)
        self.turns = 4 if rotations else 1
        self.pool = int(self._starts[-1]) * self.turns
        if images > self.pool:
            raise DataError(f"{key}: {images} images per batch, but {where} of {store.path} has {self.pool}; "
                            "lower it")
        _, h, w = store.image_shape
        if rotations and h != w:
            raise DataError(f"rotations need square images, {store.path} holds {h}x{w}; set rotations=False")
        self._epoch: tuple[tuple[int, int], np.ndarray] | None = None

    @property
    def num_classes(self) -> int:
        """Labels of the batches: the split's classes, times 4 with rotations."""
        return len(self.classes) * self.turns

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.store.image_shape

    def steps_per_epoch(self) -> float:
        return self.pool / (self.images * self.per_step)

    def positions(self, ids: EpisodeIds, index: int) -> np.ndarray:
        """Items of the pool in batch ``index`` of ``ids``: one epoch's permutation, or the end of one and the
        start of the next."""
        first = (ids.step * self.per_step + index) * self.images
        at = np.arange(first, first + self.images, dtype=np.int64)
        epochs = at // self.pool
        out = np.empty_like(at)
        for e in np.unique(epochs):
            mask = epochs == e
            out[mask] = self._permutation(ids, int(e))[at[mask] % self.pool]
        return out

    def _permutation(self, ids: EpisodeIds, epoch: int) -> np.ndarray:
        key = (ids.seed, int(ids.purpose), epoch)
        if self._epoch is None or self._epoch[0] != key:  # a worker's shares walk through one or two epochs a step
            self._epoch = (key, episode_rng(ids.seed, epoch, 0, ids.purpose).permutation(self.pool))
        return self._epoch[1]

    def sample(self, ids: EpisodeIds) -> EpisodeBatch:
        x, y = zip(*(self._batch(ids, i) for i in ids.indices))
        xs = np.stack(x)
        if self.augment is not None:
            draws = [self.augment.draw(episode_rng(ids.seed, ids.step, i, ids.purpose, stream=AUGMENT), self.images)
                     for i in ids.indices]
            shape = xs.shape
            xs = self.augment.apply(xs.reshape(-1, *shape[2:]), concat_draws(draws)).reshape(shape)
        t = len(ids.indices)
        return EpisodeBatch(torch.from_numpy(xs), torch.from_numpy(np.stack(y)),
                            torch.zeros((t, 0, *xs.shape[2:]), dtype=torch.float32),
                            torch.zeros((t, 0), dtype=torch.int64))

    def _batch(self, ids: EpisodeIds, index: int) -> tuple[np.ndarray, np.ndarray]:
        items = self.positions(ids, index)
        image, turns = items // self.turns, items % self.turns
        member = np.searchsorted(self._starts, image, side="right") - 1  # position of the class in the split
        pixels = []
        for m, j, q in zip(member.tolist(), image.tolist(), turns.tolist()):
            picked = self.store.images(self.classes[m])[j - int(self._starts[m])]
            pixels.append(np.rot90(picked, k=q, axes=(1, 2)) if q else picked)
        labels = member * self.turns + turns
        return np.stack(pixels).astype(np.float32) / np.float32(255), labels.astype(np.int64)

    def __repr__(self) -> str:
        return (f"ImageBatches({self.images} images x {self.per_step} per step over {len(self.classes)} classes"
                f"{' x4 rotations' if self.rotations else ''}{' augmented' if self.augment else ''} of "
                f"{self.store!r})")
