"""Gradient-descent adaptation on one task, shared by MAML, ANIL, Reptile and the fine-tuning baselines.

Functions take one task's unbatched tensors so they compose with
``torch.func.vmap`` over the task axis and with ``torch.func.grad`` around them
(second-order MAML differentiates straight through ``sgd``).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.func import grad

from learners.objective import Objective
from learners.params import Params
from learners.strategy import map_over_tasks

ModelFn = Callable[[Params, torch.Tensor], torch.Tensor]


def sgd(
    model: ModelFn,
    objective: Objective,
    params: Params,
    keys: tuple[str, ...],
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    lr: float,
    first_order: bool = False,
) -> Params:
    """``steps`` plain SGD steps on ``objective(model(params, x), y)`` over the entries ``keys``.

    Returns new parameters; ``params`` is untouched. With ``first_order`` the
    inner gradients are detached, so an outer derivative sees each step as the
    identity (FOMAML).
    """
    for _ in range(steps):
        sub = {k: params[k] for k in keys}
        g = grad(lambda s: objective.loss(model({**params, **s}, x), y))(sub)
        params = {**params, **{k: sub[k] - lr * (g[k].detach() if first_order else g[k]) for k in keys}}
    return params


def adaptation_curve(
    model: ModelFn,
    objective: Objective,
    start: Params,
    keys: tuple[str, ...],
    support: tuple[torch.Tensor, torch.Tensor],
    query: tuple[torch.Tensor, torch.Tensor],
    steps: int,
    lr: float,
) -> dict[str, torch.Tensor]:
    """Query loss (and metrics) after 0, 1, ..., ``steps`` SGD steps on the support set: ``[steps + 1]`` each."""
    rows: list[dict[str, torch.Tensor]] = []
    params = start
    for s in range(steps + 1):
        with torch.no_grad():
            pred = model(params, query[0])
            rows.append({"loss": objective.loss(pred, query[1]), **objective.metrics(pred, query[1])})
        if s < steps:
            params = sgd(model, objective, params, keys, *support, steps=1, lr=lr, first_order=True)
            params = {k: v.detach() for k, v in params.items()}
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def adaptation_curves(algorithm, params: Params, batch, steps: int, lr: float) -> dict[str, torch.Tensor]:
    """Per-task query loss (and metrics) after 0..``steps`` SGD steps, ``[T, steps + 1]`` each.

    Step 0 is the algorithm's own task model (``algorithm.start``: θ for MAML,
    the generated weights for a hypernetwork); later steps fine-tune
    ``algorithm.tunable`` entries on the support set, the MAML paper's protocol.
    """
    def curve(p, sx, sy, qx, qy):
        start = {k: v.detach() for k, v in algorithm.start(p, sx, sy).items()}
        return adaptation_curve(algorithm.predict, algorithm.objective, start, algorithm.tunable(start),
                                (sx, sy), (qx, qy), steps, lr)

    return map_over_tasks(curve, params, batch, algorithm.strategy)
