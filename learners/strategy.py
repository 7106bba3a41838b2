"""How per-task work is spread over a batch of episodes: ``vmap`` over the task axis, or a Python loop.

Which one is faster depends on the model, so it is a measured choice
(``benchmarks/throughput.py``): on this project's 2-core CPU, vmap was ~10x
faster than a loop for the sine MLP, while a loop was 1.5-2x faster than vmap
for Conv-4 (ProtoNet, FOMAML, ANIL and MAML alike). Both give the same sums up
to float rounding (tested).

Tasks whose gradient or statistics are not finite (a diverging inner loop) are
dropped from the sums and counted, so they never reach the meta-parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
from torch.func import vmap

from learners.params import Params
from tasks.episode import EpisodeBatch

Strategy = Literal["vmap", "loop"]
TaskFn = Callable[..., tuple[Params, dict[str, torch.Tensor]]]


@dataclass
class Summed:
    """Sum over the kept tasks of each task's meta-gradient and statistics."""

    grads: Params
    stats: dict[str, float]
    tasks: int
    dropped: int = 0
    per_task_finite: list[bool] = field(default_factory=list)


def _finite(tree: dict[str, torch.Tensor], batched: bool) -> torch.Tensor:
    # A sum is finite iff every term is (an inf or NaN propagates; inf - inf is NaN): one pass per tensor.
    # Overflowing a float32 sum needs entries near 1e38, which is divergence too.
    flags = [torch.isfinite(v.reshape(v.shape[0], -1).sum(1) if batched else v.sum()) for v in tree.values()]
    return torch.stack(flags).all(0)


def kept_stats(stats: dict[str, torch.Tensor], ok: torch.Tensor) -> dict[str, float]:
    """Sums over the kept tasks (``ok`` [T]) of per-task statistics ``{name: [T]}``."""
    if bool(ok.all()):
        return {k: float(v.sum()) for k, v in stats.items()}
    return {k: float(torch.where(ok, v, 0).sum()) for k, v in stats.items()}


def sum_over_tasks(task_fn: TaskFn, params: Params, batch: EpisodeBatch, strategy: Strategy) -> Summed:
    """Apply ``task_fn(params, sx, sy, qx, qy) -> (grads, stats)`` to every task and sum the finite ones."""
    tensors = (batch.support_x, batch.support_y, batch.query_x, batch.query_y)
    if strategy == "vmap":
        grads, stats = vmap(task_fn, in_dims=(None, 0, 0, 0, 0))(params, *tensors)
        ok = _finite(grads, True) & _finite(stats, True)
        kept = int(ok.sum())
        if kept == len(batch):
            summed = {k: v.sum(0) for k, v in grads.items()}
        else:
            summed = {k: torch.where(ok.view(-1, *[1] * (v.dim() - 1)), v, 0).sum(0) for k, v in grads.items()}
        return Summed(summed, kept_stats(stats, ok), kept, len(batch) - kept, ok.tolist())
    if strategy == "loop":
        acc = {k: torch.zeros_like(v) for k, v in params.items()}
        totals: dict[str, float] = {}
        flags: list[bool] = []
        for i in range(len(batch)):
            g, s = task_fn(params, *(t[i] for t in tensors))
            ok = bool(_finite(g, False) & _finite(s, False))
            flags.append(ok)
            if ok:
                acc = {k: acc[k] + g[k] for k in acc}
                for k, v in s.items():
                    totals[k] = totals.get(k, 0.0) + float(v)
        return Summed(acc, totals, sum(flags), len(flags) - sum(flags), flags)
    raise ValueError(f"unknown strategy {strategy!r}; use 'vmap' or 'loop'")


def map_over_tasks(fn: Callable[..., dict[str, torch.Tensor]], params: Params, batch: EpisodeBatch, strategy: Strategy) -> dict[str, torch.Tensor]:
    """Per-task outputs of ``fn(params, sx, sy, qx, qy)`` stacked along a leading task axis (for evaluation)."""
    tensors = (batch.support_x, batch.support_y, batch.query_x, batch.query_y)
    if strategy == "vmap":
        return vmap(fn, in_dims=(None, 0, 0, 0, 0))(params, *tensors)
    rows = [fn(params, *(t[i] for t in tensors)) for i in range(len(batch))]
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
