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

Two streams serve the task sources. ``episode_rng`` is a full numpy Generator
per episode (image episodes: choices without replacement). ``episode_uniforms``
draws a whole share's uniforms at once from a counter-based generator
(SplitMix64 of a per-episode key plus the draw's counter): a few vectorized
numpy operations for all episodes, where building a Generator per episode cost
more than the sine tasks' arithmetic (~20 us each).

>>> rng = episode_rng(seed=0, step=3, index=7)
>>> float(rng.random()) == float(episode_rng(0, 3, 7).random())
True
>>> u = episode_uniforms(EpisodeIds(seed=0, step=3, indices=(6, 7)), 4)
>>> bool((u[1] == episode_uniforms(EpisodeIds(0, 3, (7,)), 4)[0]).all())
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
    BATCH = 3  # training minibatches of images with their split-global labels (tasks.minibatch, pre-training)


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


_MASK = 2**64 - 1
_GAMMA = 0x9E3779B97F4A7C15  # SplitMix64's increment (the golden ratio in 64 bits)
_M1, _M2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _mix(z: int) -> int:
    """SplitMix64's finalizer on a Python int: a bijection of 64-bit words in which every output bit depends on
    every input bit."""
    z = ((z ^ (z >> 30)) * _M1) & _MASK
    z = ((z ^ (z >> 27)) * _M2) & _MASK
    return z ^ (z >> 31)


def _mix_array(z: np.ndarray) -> np.ndarray:
    """``_mix`` on a uint64 array (numpy's array arithmetic wraps modulo 2**64, as the finalizer wants)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(_M1)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(_M2)
    return z ^ (z >> np.uint64(31))


def episode_uniforms(ids: EpisodeIds, n: int) -> np.ndarray:
    """``[len(ids), n]`` float64 uniforms in [0, 1): draw ``j`` of each episode, a function of
    ``(seed, purpose, step, index, j)`` only.

    The key of an episode absorbs the seed (64-bit word by word), the purpose, the step and the index, each
    through SplitMix64's finalizer; draw ``j`` is the finalizer of ``key + (j + 1) * gamma`` (the SplitMix64
    sequence seeded with the key), its top 53 bits scaled to [0, 1).
    """
    if min(ids.seed, ids.step, *ids.indices, 0) < 0:
        raise ValueError(f"episode ids are non-negative, got seed={ids.seed} step={ids.step} indices={ids.indices}")
    h, seed = _mix(_GAMMA), ids.seed
    while True:  # every 64-bit word of the seed, at least one
        h, seed = _mix(h ^ (seed & _MASK)), seed >> 64
        if not seed:
            break
    h = _mix(_mix(h ^ int(ids.purpose)) ^ (ids.step & _MASK))
    keys = _mix_array(np.uint64(h) ^ np.asarray(ids.indices, dtype=np.uint64))
    counters = np.arange(1, n + 1, dtype=np.uint64) * np.uint64(_GAMMA)
    bits = _mix_array(keys[:, None] + counters[None, :])
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53


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

    def channels_last(self) -> "EpisodeBatch":
        """The batch with its images ``[T, n, C, H, W]`` laid out channels-last: each image set ``[n, C, H, W]``
        (and the whole share flattened to ``[T * n, C, H, W]``) is then an NHWC tensor, the layout convolutions
        run fastest in on tensor cores. The same values."""

        def nhwc(x: torch.Tensor) -> torch.Tensor:
            return x.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3) if x.dim() == 5 else x

        return EpisodeBatch(nhwc(self.support_x), self.support_y, nhwc(self.query_x), self.query_y)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "EpisodeBatch":
        """The batch on ``device`` (floating tensors in ``dtype`` if given; labels keep theirs). To a GPU it is
        one copy for the whole share, from pinned memory (``transfer``), not one per tensor."""
        tensors = (self.support_x, self.support_y, self.query_x, self.query_y)
        if dtype is not None:
            tensors = tuple(t.to(dtype) if t.is_floating_point() else t for t in tensors)
        device = torch.device(device)
        if device.type == "cuda":
            return EpisodeBatch(*transfer(tensors, device, pin=True))
        return EpisodeBatch(*(t.to(device) for t in tensors))


def transfer(tensors: tuple[torch.Tensor, ...], device: torch.device, pin: bool) -> list[torch.Tensor]:
    """``tensors`` on ``device`` in one copy: their bytes packed into one host buffer (page-locked with ``pin``,
    so the copy is asynchronous and at full bus speed), copied at once and viewed back as the originals."""
    sizes = [t.numel() * t.element_size() for t in tensors]
    offsets = [0]
    for n in sizes:
        offsets.append(offsets[-1] + -(-n // 64) * 64)  # each tensor 64-byte aligned, so any dtype can view it
    staging = torch.empty(offsets[-1], dtype=torch.uint8, pin_memory=pin)
    for t, start, n in zip(tensors, offsets, sizes):
        staging[start:start + n].copy_(t.contiguous().reshape(-1).view(torch.uint8))
    moved = staging.to(device, non_blocking=pin)
    return [moved[start:start + n].view(t.dtype).view(t.shape) for t, start, n in zip(tensors, offsets, sizes)]


class TaskSource(Protocol):
    """Anything that turns episode ids into a stacked batch (sine tasks, image stores)."""

    def sample(self, ids: EpisodeIds) -> EpisodeBatch: ...
