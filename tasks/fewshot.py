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

``within_group=True`` draws all ``n_way`` classes of an episode from one group
(one Omniglot alphabet: the within-alphabet protocol of Lake et al., harder
than across alphabets). The group is drawn first, uniformly among the split's
groups that have at least ``n_way`` classes (with rotations, 4 per class),
then the classes within it, all from the episode's generator.

``augment`` (``tasks.augment``) distorts the support and/or query images of
every episode with the episode's own augmentation generator, drawn after the
episode's images from a separate stream: an augmented episode holds the same
classes and images as the plain one, and is still a function of its id only.

>>> store = ImageStore.open("omniglot.arrow")
>>> splits = split_classes(store, by="group", train=0.7, val=0.1, test=0.2, seed=0)
>>> tasks = FewShotTasks(store, n_way=5, k_shot=1, query=15, classes=splits.train, rotations=True)
>>> tuple(tasks.sample(EpisodeIds(seed=0, step=0, indices=(0, 1))).support_x.shape)
(2, 5, 1, 28, 28)
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from tasks.augment import Augment, concat_draws
from tasks.episode import AUGMENT, EpisodeBatch, EpisodeIds, episode_rng
from tasks.store import DataError, ImageStore


class FewShotTasks:
    """Seed-addressed N-way K-shot episodes over the classes ``classes`` (store class indices) of ``store``.

    Impossible shapes are refused at construction, every problem in one line: ``keys`` names each
    of n_way, k_shot, query (and within_group) as the caller knows it (e.g. ``task.train.n_way``) and
    ``where`` says which classes these are (e.g. "the train split").
    """

    def __init__(self, store: ImageStore | str | Path, n_way: int, k_shot: int, query: int,
                 classes: Sequence[int], rotations: bool = False, *, within_group: bool = False,
                 augment: Augment | None = None, augment_support: bool = True, augment_query: bool = True,
                 keys: Mapping[str, str] | None = None, where: str = "this split") -> None:
        self.store = store if isinstance(store, ImageStore) else ImageStore.open(store)
        self.n_way, self.k_shot, self.query, self.rotations = n_way, k_shot, query, rotations
        self.within_group = within_group
        self.augment = augment if augment else None
        self.augment_support, self.augment_query = augment_support, augment_query
        self.classes: tuple[int, ...] = tuple(int(c) for c in classes)
        key = {name: name for name in ("n_way", "k_shot", "query", "within_group")} | dict(keys or {})
        self._check_classes(where)
        self._groups: list[np.ndarray] = []
        problems = self._shape_problems(key, where)
        if problems:
            raise DataError("; ".join(problems))
        self._labels_s = np.repeat(np.arange(n_way, dtype=np.int64), k_shot)
        self._labels_q = np.repeat(np.arange(n_way, dtype=np.int64), query)

    def _check_classes(self, where: str) -> None:
        if not self.classes:
            raise DataError(f"no classes in {where} of {self.store.path}; give the split classes "
                            "(task.split.train/val/test)")
        bad = sorted({c for c in self.classes if not 0 <= c < self.store.num_classes})
        if bad:
            raise DataError(f"class indices {bad[:5]} are out of range for {self.store.path} "
                            f"({self.store.num_classes} classes)")
        if len(set(self.classes)) != len(self.classes):
            raise DataError("the classes of a split must be distinct; a class index is listed twice")
        _, h, w = self.store.image_shape
        if self.rotations and h != w:
            raise DataError(f"rotations need square images, {self.store.path} holds {h}x{w}; set rotations=False")

    def _shape_problems(self, key: dict[str, str], where: str) -> list[str]:
        """Every reason the episode shape does not fit these classes, each naming its key."""
        problems = [f"{key[name]}: must be >= 1, got {value}"
                    for name, value in (("n_way", self.n_way), ("k_shot", self.k_shot), ("query", self.query))
                    if value < 1]
        if problems:
            return problems
        per_class = 4 if self.rotations else 1
        extra = " (with rotations, 4 per class)" if self.rotations else ""
        if self.within_group:
            by_group: dict[str, list[int]] = {}
            for v, c in enumerate(np.repeat(self.classes, per_class).tolist()):
                by_group.setdefault(self.store.groups[c], []).append(v)
            if list(by_group) == [""]:
                problems.append(f"{key['within_group']}: {self.store.path} has no groups to draw episodes within "
                                "(its classes have group ''); set it to false")
            else:
                self._groups = [np.asarray(by_group[g]) for g in sorted(by_group) if len(by_group[g]) >= self.n_way]
                if not self._groups:
                    largest = max(by_group, key=lambda g: len(by_group[g]))
                    problems.append(f"{key['n_way']}: {self.n_way} classes from one group, but the largest group of "
                                    f"{where} ({largest!r}) has {len(by_group[largest])} classes{extra}; lower it "
                                    f"or set {key['within_group']}: false")
        elif self.n_way > self.num_classes:
            problems.append(f"{key['n_way']}: {self.n_way} is more than the {self.num_classes} classes{extra} of "
                            f"{where}; lower it or give the split more classes")
        smallest = min(self.classes, key=self.store.count)
        if self.k_shot + self.query > self.store.count(smallest):
            problems.append(f"{key['k_shot']} + {key['query']}: {self.k_shot} + {self.query} = "
                            f"{self.k_shot + self.query} images per class, but class "
                            f"{self.store.class_names[smallest]!r} of {where} has only {self.store.count(smallest)}; "
                            "lower them, or leave that class out of the split")
        return problems

    @property
    def num_classes(self) -> int:
        """Classes episodes are drawn from: the split's classes, times 4 with rotations."""
        return len(self.classes) * (4 if self.rotations else 1)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.store.image_shape

    def sample(self, ids: EpisodeIds) -> EpisodeBatch:
        support, query = zip(*(self._episode(ids, i) for i in ids.indices))
        support_x, query_x = np.stack(support), np.stack(query)
        if self.augment is not None:
            support_x, query_x = self._augmented(ids, support_x, query_x)
        t = len(ids.indices)
        return EpisodeBatch(
            torch.from_numpy(support_x),
            torch.from_numpy(np.broadcast_to(self._labels_s, (t, len(self._labels_s))).copy()),
            torch.from_numpy(query_x),
            torch.from_numpy(np.broadcast_to(self._labels_q, (t, len(self._labels_q))).copy()),
        )

    def episode_classes(self, ids: EpisodeIds, index: int) -> list[tuple[int, int]]:
        """(store class index, rotation in quarter turns) of each label 0..n_way-1 of episode ``index``."""
        return self._choose(episode_rng(ids.seed, ids.step, index, ids.purpose))

    def _choose(self, rng: np.random.Generator) -> list[tuple[int, int]]:
        # choice without replacement returns the classes in random order: label i is the i-th drawn.
        if self.within_group:
            members = self._groups[int(rng.integers(len(self._groups)))]
            drawn = members[rng.choice(len(members), size=self.n_way, replace=False)]
        else:
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

    def _augmented(self, ids: EpisodeIds, support_x: np.ndarray, query_x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Support and/or query distorted, each episode by its own augmentation generator, in one pass."""
        aug, shape = self.augment, support_x.shape[2:]
        draws_s, draws_q = [], []
        for index in ids.indices:
            rng = episode_rng(ids.seed, ids.step, index, ids.purpose, stream=AUGMENT)
            if self.augment_support:
                draws_s.append(aug.draw(rng, support_x.shape[1]))
            if self.augment_query:
                draws_q.append(aug.draw(rng, query_x.shape[1]))
        if draws_s:
            support_x = aug.apply(support_x.reshape(-1, *shape), concat_draws(draws_s)).reshape(support_x.shape)
        if draws_q:
            query_x = aug.apply(query_x.reshape(-1, *shape), concat_draws(draws_q)).reshape(query_x.shape)
        return support_x, query_x

    def __repr__(self) -> str:
        return (f"FewShotTasks({self.n_way}-way {self.k_shot}-shot {self.query}-query over {len(self.classes)} "
                f"classes{' x4 rotations' if self.rotations else ''}{' within groups' if self.within_group else ''}"
                f"{' augmented' if self.augment else ''} of {self.store!r})")


def _to_unit(pixels: np.ndarray) -> np.ndarray:
    return pixels.astype(np.float32) / np.float32(255)
