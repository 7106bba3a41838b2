"""MAML's per-task losses for a whole batch of tasks at once, on backbones that take task-batched parameters.

vmap runs every operation through functorch's batching layer, and MAML's inner gradient adds a
``torch.func.grad`` level under it: on the small sine MLP that per-operation cost is most of a
meta-step. A backbone with ``forward_tasks(params, x)`` (``learners.mlp.MLP``: one ``baddbmm`` per
layer) runs T task models at once from parameters with a leading task axis. The inner gradients are
then ``torch.autograd`` gradients of the summed support losses with respect to θ broadcast along that
axis (task t's copy only enters task t's loss, so its gradient is task t's own), and the outer
gradient is one backward through all of it. The same numbers as vmap over ``MAML.task_loss`` up to
float rounding (tested).

It covers plain MAML, FOMAML and ANIL: fixed-rate SGD steps (no MAML++ option, no checkpointing) on ``tunable`` entries, the query loss
after the last one. For anything else (a subclass, an option it does not know) ``batched_losses``
returns None and MAML takes a gradient per task with vmap.
"""

from __future__ import annotations

import dataclasses

import torch

from learners.params import Params
from learners.strategy import LossFn

# The MAML fields this file implements; a MAML whose other fields are not at their defaults is not plain.
_KNOWN = {"model", "objective", "inner_steps", "inner_lr", "first_order", "inner_keys", "strategy", "name",
          "compile", "_cache", "update"}


def batched_losses(maml) -> LossFn | None:
    """``(params, sx, sy, qx, qy) -> (losses [T], stats {name: [T]})`` for all tasks at once, or None where
    the backbone has no ``forward_tasks`` or ``maml`` is not plain MAML/FOMAML/ANIL."""
    from learners.maml import MAML  # here: learners.maml imports this module

    forward, objective = getattr(maml.model, "forward_tasks", None), maml.objective
    if forward is None or not hasattr(objective, "task_losses") or type(maml) is not MAML or not _at_defaults(maml):
        return None

    def losses(params: Params, sx: torch.Tensor, sy: torch.Tensor, qx: torch.Tensor, qy: torch.Tensor):
        theta = {k: v.expand(len(sx), *v.shape) for k, v in params.items()}
        keys = maml.tunable(params)
        task = theta
        for _ in range(maml.inner_steps):
            inner = objective.task_losses(forward(task, sx), sy).sum()
            g = torch.autograd.grad(inner, [task[k] for k in keys], create_graph=not maml.first_order,
                                    allow_unused=True)
            task = {**task, **{k: task[k] if gk is None else task[k] - maml.inner_lr * gk for k, gk in zip(keys, g)}}
        pred_after = forward(task, qx)
        losses = objective.task_losses(pred_after, qy)
        with torch.no_grad():
            pred_before = forward(theta, qx)
            stats = {"loss_before": objective.task_losses(pred_before, qy),
                     **{f"{k}_before": v for k, v in objective.task_metrics(pred_before, qy).items()},
                     "loss_after": losses.detach(),
                     **{f"{k}_after": v for k, v in objective.task_metrics(pred_after, qy).items()}}
        return losses, stats

    return losses


def _at_defaults(maml) -> bool:
    from learners.inner_update import InnerUpdate

    if maml.update != InnerUpdate(maml.inner_lr):  # learned rates, per-step norms, a proximal pull
        return False
    for f in dataclasses.fields(maml):
        if f.name in _KNOWN:
            continue
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if getattr(maml, f.name) != default:
            return False
    return True
