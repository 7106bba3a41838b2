"""Episodes: what one task is, how a batch of them is stacked, and where their seeds come from.

An episode is one task's support set (to adapt on) and query set (to score the
adapted model on). A batch of T episodes is stored as stacked tensors with a
leading task axis so a learner can ``torch.func.vmap`` over tasks:

    batch.support_x  [T, K, *x_shape]     batch.support_y  [T, K, *y_shape]
    batch.query_x    [T, Q, *x_shape]     batch.query_y    [T, Q, *y_shape]

Episode identity: episode ``index`` of meta-step ``step`` is drawn from a
generator seeded only by ``(seed, purpose, step, index)``. Any process can
therefore rebuild any episode bit for bit, so a meta-batch does not depend on
how many workers computed it, and a share lost with a dead worker is recomputed
exactly elsewhere. ``purpose`` keeps training and evaluation streams apart even
when a run's seed equals the evaluation seed. ``stream`` gives one episode
further independent generators (``AUGMENT``: its augmentation), so adding a
random part to an episode never changes which classes and images it draws.

>>> rng = episode_rng(seed=0, step=3, index=7)
>>> float(rng.random()) == float(episode_rng(0, 3, 7).random())
True
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Protocol

import numpy as np
import torch


class Purpose(IntEnum):
    TRAIN = 0
    EVAL = 1
    VAL = 2  # validation during training: fixed episodes of their own stream


SAMPLE, AUGMENT = 0, 1
"""Streams of one episode: its classes and images (``SAMPLE``), its augmentation (``AUGMENT``)."""


@dataclass(frozen=True)
class EpisodeIds:
    """Seed-addressed episode ids: what the learner ships to a worker instead of data."""

    seed: int
    step: int
    indices: tuple[int, ...]
    purpose: Purpose = Purpose.TRAIN

    def __len__(self) -> int:
        return len(self.indices)

    def split(self, shares: int) -> list["EpisodeIds"]:
        """Contiguous, near-equal shares; empty shares are dropped."""
        chunks = np.array_split(np.asarray(self.indices, dtype=np.int64), shares)
        return [
            EpisodeIds(self.seed, self.step, tuple(int(i) for i in c), self.purpose)
            for c in chunks
            if len(c)
        ]


def episode_rng(seed: int, step: int, index: int, purpose: Purpose = Purpose.TRAIN,
                stream: int = SAMPLE) -> np.random.Generator:
    """The generator of one episode's ``stream``, a function of its id only."""
    if min(seed, step, index, stream) < 0:
        raise ValueError(f"episode ids are non-negative, got seed={seed} step={step} index={index} stream={stream}")
    # The sampling stream keeps its original 3-word spawn key, so episodes drawn before streams existed are unchanged;
    # another stream appends a non-zero word (a different SeedSequence pool).
    key = (int(purpose), step, index) if stream == SAMPLE else (int(purpose), step, index, stream)
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=key)))


@dataclass(frozen=True)
class EpisodeBatch:
    """T episodes stacked along a leading task axis."""

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor

    def __post_init__(self) -> None:
        t = {v.shape[0] for v in (self.support_x, self.support_y, self.query_x, self.query_y)}
        if len(t) != 1:
            raise ValueError(f"support and query tensors disagree on the number of tasks: {sorted(t)}")

    def __len__(self) -> int:
        return self.support_x.shape[0]

    def task(self, i: int) -> "EpisodeBatch":
        """Episode ``i`` as a batch of one (keeps the task axis)."""
        return self[i : i + 1]

    def __getitem__(self, sl: slice) -> "EpisodeBatch":
        return EpisodeBatch(self.support_x[sl], self.support_y[sl], self.query_x[sl], self.query_y[sl])

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "EpisodeBatch":
        def move(t: torch.Tensor) -> torch.Tensor:
            # Labels (integer dtypes) keep their dtype; only floating tensors follow `dtype`.
            return t.to(device, dtype if (dtype is not None and t.is_floating_point()) else None)

        return EpisodeBatch(move(self.support_x), move(self.support_y), move(self.query_x), move(self.query_y))


class TaskSource(Protocol):
    """Anything that turns episode ids into a stacked batch (sine tasks, image stores)."""

    def sample(self, ids: EpisodeIds) -> EpisodeBatch: ...
