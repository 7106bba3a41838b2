"""How per-task work is spread over a batch of episodes: ``vmap`` over the task axis, a Python loop, or, for
head-only learners, one backbone pass for all the tasks (``onepass``).

Which one is faster depends on the model and the device, so it is a measured choice
(``benchmarks/throughput.py``, ``benchmarks/gpu_check.py``): on this project's 2-core CPU, vmap was
~10x faster than a loop for the sine MLP, while a loop was 1.5-2x faster than vmap for Conv-4
(ProtoNet, FOMAML, ANIL and MAML alike). All give the same sums up to float rounding (tested).

``onepass`` is for algorithms whose backbone is the same function of θ for every task (ProtoNet, MetaOptNet,
ANIL's body): the support and query images of all the share's tasks go through it as one batch, each set still
normalized by its own batch statistics (``learners.models.norm``), and the per-task heads run on the embeddings.
The algorithm computes every task's loss from that pass (``sum_in_passes``); ``tasks_per_pass`` cuts a share
whose pass would not fit in memory into chunks.

Two ways to sum over tasks:

- ``sum_over_tasks(task_fn, ...)``: ``task_fn`` returns each task's gradient (vmap batches it, a loop
  runs it task by task); any algorithm, e.g. Reptile's θ − φ.
- ``sum_of_losses(batched, ...)``: for a function that computes every task's loss at once without vmap
  (``learners.algorithms.maml_batched``): ONE backward of their sum, cheaper than a gradient per task. (One
  backward through ``vmap`` of a per-task loss with an inner ``torch.func.grad`` is not an option: on
  PyTorch 2.13 it is ~1% off for Conv-4's batch norm, second order; ``tests/test_hot_path.py``.)

Tasks whose gradient or statistics are not finite (a diverging inner loop) are dropped from the sums
and counted, so they never reach the meta-parameters. ``sum_of_losses`` checks the per-task losses,
the statistics and the summed gradient at once; only when something is not finite does it recompute
per-task gradients to find the offenders. Either way the host waits for the device once per call
(one transfer of the sums and flags), never once per task.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
from torch.func import grad, vmap

from learners.params import Params
from tasks.episode import EpisodeBatch

Strategy = Literal["vmap", "loop", "onepass"]
TaskFn = Callable[..., tuple[Params, dict[str, torch.Tensor]]]
LossFn = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]
TASK_AXES = (None, 0, 0, 0, 0)  # params shared, episode tensors batched


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
    """Sums over the kept tasks (``ok`` [T]) of per-task statistics ``{name: [T]}``, in one transfer."""
    if not stats:
        return {}
    sums = torch.stack([torch.where(ok, v, 0).sum() for v in stats.values()])
    return dict(zip(stats, sums.tolist()))


def _episode_tensors(batch: EpisodeBatch) -> tuple[torch.Tensor, ...]:
    return batch.support_x, batch.support_y, batch.query_x, batch.query_y


def sum_over_tasks(task_fn: TaskFn, params: Params, batch: EpisodeBatch, strategy: Strategy,
                   compiled: TaskFn | None = None) -> Summed:
    """Apply ``task_fn(params, sx, sy, qx, qy) -> (grads, stats)`` to every task and sum the finite ones.

    ``compiled`` (``compiled_tasks``) stands in for ``vmap(task_fn)`` (vmap) or ``task_fn`` (loop).
    """
    tensors = _episode_tensors(batch)
    if strategy == "vmap":
        grads, stats = (compiled or vmap(task_fn, in_dims=TASK_AXES))(params, *tensors)
        ok = _finite(grads, True) & _finite(stats, True)
        return _masked_sums(grads, stats, ok)
    if strategy == "loop":
        # Tensors only, no host synchronization per task: a task's terms are masked on the device.
        acc = {k: torch.zeros_like(v) for k, v in params.items()}
        rows: list[dict[str, torch.Tensor]] = []
        flags: list[torch.Tensor] = []
        for i in range(len(batch)):
            g, s = (compiled or task_fn)(params, *(t[i] for t in tensors))
            ok = _finite(g, False) & _finite(s, False)
            acc = {k: acc[k] + torch.where(ok, g[k], 0) for k in acc}
            rows.append(s)
            flags.append(ok)
        ok = torch.stack(flags)
        stats = {k: torch.stack([r[k] for r in rows]) for k in rows[0]} if rows else {}
        return _summed(acc, stats, ok)
    raise ValueError(f"strategy {strategy!r} does not run a per-task function; use 'vmap' or 'loop'")


def compiled_tasks(task_fn: TaskFn, strategy: Strategy) -> TaskFn:
    """``torch.compile`` of the per-task function as ``sum_over_tasks`` calls it (batched with vmap, or per task).

    Its first call compiles (seconds to minutes on a CPU: ``benchmarks/throughput.py --compile`` reports it),
    and so does the first call with another number of tasks: keep it and pass it to every call.
    """
    # dynamic=False: a share's size is fixed, and symbolic sizes broke Conv-4's double backward on CUDA (torch 2.11)
    return torch.compile(vmap(task_fn, in_dims=TASK_AXES) if strategy == "vmap" else task_fn, dynamic=False)


def _masked_sums(grads: Params, stats: dict[str, torch.Tensor], ok: torch.Tensor) -> Summed:
    """Sums over the task axis of batched ``grads`` and ``stats``, the tasks where ``ok`` is False left out."""
    summed = {k: torch.where(ok.view(-1, *[1] * (v.dim() - 1)), v, 0).sum(0) for k, v in grads.items()}
    return _summed(summed, stats, ok)


def _summed(grads: Params, stats: dict[str, torch.Tensor], ok: torch.Tensor) -> Summed:
    # The flags and the kept statistics' sums in one transfer: the host waits here, once.
    sums = [torch.where(ok, v, 0).sum().to(torch.float64) for v in stats.values()]
    values = torch.cat([ok.to(torch.float64), torch.stack(sums)]).tolist() if sums else ok.to(torch.float64).tolist()
    flags = [v != 0 for v in values[:len(ok)]]
    kept = sum(flags)
    return Summed(grads, dict(zip(stats, values[len(ok):])), kept, len(flags) - kept, flags)


def sum_of_losses(batched: LossFn, loss_fn: LossFn, params: Params, batch: EpisodeBatch,
                  fallback: Strategy = "vmap") -> Summed:
    """Sum over tasks of the gradient of ``loss_fn(params, sx, sy, qx, qy) -> (loss, stats)`` and of its stats,
    from ``batched``, which computes every task's loss and stats at once (``[T]`` each) with the same numbers.

    One backward of the summed losses. If any loss, statistic or the summed gradient is not finite, the per-task
    gradients of ``loss_fn`` are recomputed (``sum_over_tasks`` with ``fallback``) to drop the offenders.
    """
    tensors = _episode_tensors(batch)
    leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
    with torch.enable_grad():
        losses, stats = batched(leaves, *tensors)
        grads = _grad(losses.sum(), leaves)
    # One transfer: the losses' sum, each gradient's sum and each statistic's sum (finite iff every term is).
    sums = torch.stack([losses.detach().sum(), *(g.sum() for g in grads.values()),
                        *(v.sum() for v in stats.values())]).tolist()
    if all(map(math.isfinite, sums)):
        n = len(batch)
        return Summed(grads, dict(zip(stats, sums[1 + len(grads):])), n, 0, [True] * n)
    return sum_over_tasks(gradient_of(loss_fn), params, batch, fallback)


def sum_in_passes(batched: LossFn, loss_fn: LossFn, params: Params, batch: EpisodeBatch,
                  tasks_per_pass: int | None = None) -> Summed:
    """The ``onepass`` strategy: ``sum_of_losses`` of ``batched`` (every task's loss from one backbone pass) over
    chunks of ``tasks_per_pass`` tasks (None: the whole share at once), each with its own backward.

    Where a chunk has a non-finite term, its tasks are recomputed one at a time (``loss_fn``, loop), so the
    same tasks are dropped as on the per-task path.
    """
    return merged([sum_of_losses(batched, loss_fn, params, part, fallback="loop")
                   for part in chunks(batch, tasks_per_pass)])


def chunks(batch: EpisodeBatch, tasks: int | None) -> list[EpisodeBatch]:
    """``batch`` cut into consecutive parts of ``tasks`` tasks (the last may be shorter); None: ``[batch]``."""
    if tasks is None or tasks >= len(batch):
        return [batch]
    return [batch[i:i + tasks] for i in range(0, len(batch), tasks)]


def merged(parts: list[Summed]) -> Summed:
    """One ``Summed`` of consecutive parts of a batch: their sums added, their flags in order."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    grads = {k: sum((p.grads[k] for p in parts[1:]), first.grads[k]) for k in first.grads}
    keys = dict.fromkeys(k for p in parts for k in p.stats)
    stats = {k: sum(p.stats.get(k, 0.0) for p in parts) for k in keys}
    return Summed(grads, stats, sum(p.tasks for p in parts), sum(p.dropped for p in parts),
                  [f for p in parts for f in p.per_task_finite])


def gradient_of(loss_fn: LossFn) -> TaskFn:
    """The per-task gradient function of a per-task loss function (for ``sum_over_tasks``)."""
    return grad(loss_fn, has_aux=True)


def _grad(loss: torch.Tensor, leaves: Params) -> Params:
    values = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    return {k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(leaves.items(), values)}


def map_over_tasks(fn: Callable[..., dict[str, torch.Tensor]], params: Params, batch: EpisodeBatch, strategy: Strategy) -> dict[str, torch.Tensor]:
    """Per-task outputs of ``fn(params, sx, sy, qx, qy)`` stacked along a leading task axis (for evaluation)."""
    tensors = _episode_tensors(batch)
    if strategy == "vmap":
        return vmap(fn, in_dims=TASK_AXES)(params, *tensors)
    rows = [fn(params, *(t[i] for t in tensors)) for i in range(len(batch))]
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
