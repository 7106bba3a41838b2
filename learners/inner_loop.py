"""Gradient-descent adaptation on one task, shared by MAML (and its variants), Meta-SGD, iMAML, Reptile and the
fine-tuning baselines.

Functions take one task's unbatched tensors so they compose with
``torch.func.vmap`` over the task axis and with ``torch.func.grad`` around them
(second-order MAML differentiates straight through ``descend``). How a step
moves the parameters is the ``InnerUpdate`` rule (``learners.inner_update``).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.func import grad
from torch.utils._pytree import tree_flatten, tree_unflatten

from learners.inner_update import InnerUpdate
from learners.objective import Objective
from learners.params import Params
from learners.strategy import map_over_tasks

ModelFn = Callable[[Params, torch.Tensor], torch.Tensor]


def inner_step(
    model: ModelFn,
    objective: Objective,
    theta: Params,
    task: Params,
    keys: tuple[str, ...],
    x: torch.Tensor,
    y: torch.Tensor,
    step: int,
    update: InnerUpdate,
    first_order: bool = False,
    autograd: bool = False,
) -> Params:
    """Inner step ``step``: ``task`` after one gradient step on ``objective(model(task, x), y)`` over ``keys``.

    ``theta`` holds what the rule reads (learned rates, per-step norms, the proximal anchor). With
    ``first_order`` the support gradient is detached, so an outer derivative sees it as a constant (FOMAML).
    ``autograd`` computes the support gradient with ``torch.autograd.grad`` instead of ``torch.func.grad``:
    the same numbers, and the form that ``torch.utils.checkpoint`` can recompute (torch.func refuses
    saved-tensor hooks); ``task`` must then carry autograd history (or ``requires_grad``) for ``keys``.
    """
    task = update.at_step(theta, task, step)
    if autograd:
        leaves, spec = tree_flatten({k: task[k] for k in keys})
        loss = objective.loss(model(task, x), y)
        g = tree_unflatten(list(torch.autograd.grad(loss, leaves, create_graph=not first_order)), spec)
    else:
        g = grad(lambda s: objective.loss(model({**task, **s}, x), y))({k: task[k] for k in keys})
        if first_order:
            g = {k: v.detach() for k, v in g.items()}
    return update.apply(theta, task, g, step)


def descend(
    model: ModelFn,
    objective: Objective,
    theta: Params,
    task: Params,
    keys: tuple[str, ...],
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    update: InnerUpdate,
    first_order: bool = False,
) -> Params:
    """``steps`` inner steps from ``task``; returns new parameters, inputs untouched."""
    for s in range(steps):
        task = inner_step(model, objective, theta, task, keys, x, y, s, update, first_order)
    return task


def adaptation_curve(
    model: ModelFn,
    objective: Objective,
    start: Params,
    keys: tuple[str, ...],
    support: tuple[torch.Tensor, torch.Tensor],
    query: tuple[torch.Tensor, torch.Tensor],
    steps: int,
    update: InnerUpdate,
) -> dict[str, torch.Tensor]:
    """Query loss (and metrics) after 0, 1, ..., ``steps`` inner steps on the support set: ``[steps + 1]`` each.

    ``start`` is both the task model before adaptation and what the rule reads (rates, norms, anchor).
    """
    rows: list[dict[str, torch.Tensor]] = []
    params = update.at_step(start, start, 0)
    for s in range(steps + 1):
        with torch.no_grad():
            pred = model(params, query[0])
            rows.append({"loss": objective.loss(pred, query[1]), **objective.metrics(pred, query[1])})
        if s < steps:
            params = inner_step(model, objective, start, params, keys, *support, s, update, first_order=True)
            params = {k: v.detach() for k, v in params.items()}
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def fine_tuning_rule(algorithm, lr: float) -> InnerUpdate:
    """The rule test-time adaptation uses: the algorithm's own (``algorithm.update``, learned rates as learned)
    with fixed step ``lr``, or plain SGD at ``lr`` for algorithms without one."""
    own = getattr(algorithm, "update", None)
    return InnerUpdate(lr) if own is None else own.with_lr(lr)


def fine_tune(algorithm, params: Params, support_x: torch.Tensor, support_y: torch.Tensor, steps: int,
              lr: float) -> Params:
    """One task's model after ``steps`` test-time steps from ``algorithm.start``: the model that evaluation
    scores as "after ``steps`` steps" (``adaptation_curve``, same rule, same order of operations)."""
    update = fine_tuning_rule(algorithm, lr)
    start = {k: v.detach() for k, v in algorithm.start(params, support_x, support_y).items()}
    keys = algorithm.tunable(start)
    task = update.at_step(start, start, 0)
    for s in range(steps):
        task = inner_step(algorithm.predict, algorithm.objective, start, task, keys, support_x, support_y, s, update,
                          first_order=True)
        task = {k: v.detach() for k, v in task.items()}
    return task


def adaptation_curves(algorithm, params: Params, batch, steps: int, lr: float) -> dict[str, torch.Tensor]:
    """Per-task query loss (and metrics) after 0..``steps`` inner steps, ``[T, steps + 1]`` each.

    Step 0 is the algorithm's own task model (``algorithm.start``: θ for MAML,
    the generated weights for a hypernetwork); later steps fine-tune
    ``algorithm.tunable`` entries on the support set with ``fine_tuning_rule``, the MAML paper's protocol
    (plain SGD) for every algorithm whose inner loop is plain SGD.
    """
    update = fine_tuning_rule(algorithm, lr)
    prepare = getattr(algorithm, "prepare", None)  # optional: work on θ shared by every task (Prepared)
    if prepare is not None:
        params = prepare(params)

    def curve(p, sx, sy, qx, qy):
        start = {k: v.detach() for k, v in algorithm.start(p, sx, sy).items()}
        return adaptation_curve(algorithm.predict, algorithm.objective, start, algorithm.tunable(start),
                                (sx, sy), (qx, qy), steps, update)

    return map_over_tasks(curve, params, batch, algorithm.strategy)
