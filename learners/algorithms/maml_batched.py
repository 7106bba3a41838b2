"""MAML's per-task losses for a whole batch of tasks at once, on backbones that take task-batched parameters.

vmap runs every operation through functorch's batching layer, and MAML's inner gradient adds a
``torch.func.grad`` level under it: on the small sine MLP that per-operation cost is most of a
meta-step. A backbone with ``forward_tasks(params, x)`` (``learners.models.mlp.MLP``: one ``baddbmm`` per
layer) runs T task models at once from parameters with a leading task axis. The inner gradients are
then ``torch.autograd`` gradients of the summed support losses with respect to θ broadcast along that
axis (task t's copy only enters task t's loss, so its gradient is task t's own), and the outer
gradient is one backward through all of it. The same numbers as vmap over ``MAML.task_loss`` up to
float rounding (tested).

It computes fixed-rate SGD steps on ``keys`` and the query loss after the last one: plain MAML, FOMAML and
ANIL. Whether an algorithm is that is for the algorithm to say (``MAML.task_batched_losses``).
"""

from __future__ import annotations

from typing import Callable

import torch

from learners.objective import Objective
from learners.params import Params
from learners.strategy import LossFn


def batched_losses(forward: Callable[[Params, torch.Tensor], torch.Tensor], objective: Objective,
                   keys: tuple[str, ...], inner_steps: int, inner_lr: float, first_order: bool) -> LossFn:
    """``(params, sx, sy, qx, qy) -> (losses [T], stats {name: [T]})`` for all tasks at once: ``inner_steps``
    SGD steps of ``inner_lr`` on ``keys`` from θ, through ``forward(task_batched_params, x)`` and the objective's
    ``task_losses``."""

    def losses(params: Params, sx: torch.Tensor, sy: torch.Tensor, qx: torch.Tensor, qy: torch.Tensor):
        theta = {k: v.expand(len(sx), *v.shape) for k, v in params.items()}
        task = theta
        for _ in range(inner_steps):
            inner = objective.task_losses(forward(task, sx), sy).sum()
            g = torch.autograd.grad(inner, [task[k] for k in keys], create_graph=not first_order, allow_unused=True)
            task = {**task, **{k: task[k] if gk is None else task[k] - inner_lr * gk for k, gk in zip(keys, g)}}
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


def linear_heads(params: Params, x: torch.Tensor) -> torch.Tensor:
    """Logits ``[T, N, C]`` of T linear heads (``head.weight`` [T, C, D], ``head.bias`` [T, C]) on embeddings
    ``x`` [T, N, D]: the ``forward`` of ``batched_losses`` for a head on fixed embeddings (ANIL in one pass)."""
    return torch.baddbmm(params["head.bias"][:, None], x, params["head.weight"].mT)
