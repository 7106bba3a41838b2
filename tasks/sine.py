"""Sine-wave regression tasks (Finn et al. 2017, section 5.1).

A task is y = A sin(x - phase) with A ~ U[amplitude], phase ~ U[phase]; its
support set is ``k_shot`` points with x ~ U[support_x_range] (default: the
task's ``x_range``) and its query set is ``query`` points with x ~ U[x_range].
Setting ``support_x_range=(0, 5)`` gives the robustness probe of the MAML paper:
the model sees only half of the period at adaptation time and is scored on the
whole of it.

Support and query points are independent uniform draws (the same distribution as
disjoint draws from an unbounded pool), so any K and Q fit.

A share of episodes is drawn at once (``episode_uniforms``): per episode, draw 0
is the amplitude, 1 the phase, then ``k_shot`` support x and ``query`` query x.
(Until this stream, each episode had its own ``episode_rng`` Generator, drawn in
the same order: same distribution, other numbers.)

>>> src = SineTasks(k_shot=5, query=7)
>>> b = src.sample(EpisodeIds(seed=0, step=0, indices=(0, 1, 2)))
>>> tuple(b.support_x.shape), tuple(b.query_y.shape)
((3, 5, 1), (3, 7, 1))
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from tasks.episode import EpisodeBatch, EpisodeIds, episode_uniforms


@dataclass(frozen=True)
class SineTasks:
    k_shot: int = 10
    query: int = 10
    amplitude: tuple[float, float] = (0.1, 5.0)
    phase: tuple[float, float] = (0.0, math.pi)
    x_range: tuple[float, float] = (-5.0, 5.0)
    support_x_range: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if self.k_shot < 1 or self.query < 1:
            raise ValueError(f"k_shot and query must be >= 1, got k_shot={self.k_shot} query={self.query}")
        for name in ("amplitude", "phase", "x_range", "support_x_range"):
            lo_hi = getattr(self, name)
            if lo_hi is not None and not lo_hi[0] <= lo_hi[1]:
                raise ValueError(f"{name} must be [low, high] with low <= high, got {list(lo_hi)}")

    def task_parameters(self, ids: EpisodeIds) -> np.ndarray:
        """[T, 2] array of (amplitude, phase) per episode: the ground truth, e.g. for plots."""
        return self._draw(ids)[0]

    def sample(self, ids: EpisodeIds) -> EpisodeBatch:
        amp_phase, sx, qx = self._draw(ids)
        amp, phase = amp_phase[:, :1], amp_phase[:, 1:]
        arrays = (sx, amp * np.sin(sx - phase), qx, amp * np.sin(qx - phase))
        sx, sy, qx, qy = (torch.from_numpy(a.astype(np.float32)[..., None]) for a in arrays)
        return EpisodeBatch(sx, sy, qx, qy)

    def _draw(self, ids: EpisodeIds) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(amplitude, phase) [T, 2], support x [T, k_shot], query x [T, query], all float64."""
        u = episode_uniforms(ids, 2 + self.k_shot + self.query)
        ranges = np.array([self.amplitude, self.phase, self.support_x_range or self.x_range, self.x_range])
        # Range of each draw: amplitude, phase, then k_shot support x, then query x.
        low, high = ranges[np.repeat(np.arange(4), (1, 1, self.k_shot, self.query))].T
        values = low + (high - low) * u
        return values[:, :2], values[:, 2:2 + self.k_shot], values[:, 2 + self.k_shot:]

    @staticmethod
    def curve(amp_phase: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Ground-truth y for one task's (amplitude, phase) at points x."""
        return amp_phase[0] * np.sin(x - amp_phase[1])
