"""MAML (Finn et al. 2017) with its first-order (FOMAML) and head-only (ANIL, Raghu et al. 2020) variants.

One class: first order is a flag, ANIL is the set of parameters the inner loop
touches (``inner_keys`` = the head). The meta-gradient of a task is
d/dθ L_query(adapt(θ, support)), differentiated straight through the inner SGD
steps with ``torch.func.grad`` (second order), or with the inner gradients
detached (first order: the query gradient at the adapted point).

>>> from learners.mlp import MLP
>>> from learners.objective import MSE
>>> maml = MAML(MLP(1, [40, 40], 1), MSE(), inner_steps=1, inner_lr=0.01)
>>> theta = maml.init_params(seed=0)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import NonNegativeInt
from torch import nn
from torch.func import functional_call

from learners.inner_loop import sgd
from learners.objective import Objective, query_stats
from learners.params import Params, init_params, materialize
from learners.registry import AlgorithmConfig, Parts, register
from learners.maml_batched import batched_losses
from learners.strategy import Strategy, Summed, compiled_tasks, gradient_of, sum_of_losses, sum_over_tasks
from tasks.episode import EpisodeBatch


@dataclass
class MAML:
    model: nn.Module
    objective: Objective
    inner_steps: int = 1
    inner_lr: float = 0.01
    first_order: bool = False
    inner_keys: tuple[str, ...] | None = None  # None: every parameter (MAML); the head: ANIL
    strategy: Strategy = "vmap"
    name: str = "maml"
    compile: bool = False  # torch.compile the per-task gradient (batched with vmap): pays over long runs only
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def init_params(self, seed: int) -> Params:
        return init_params(self.model, seed)

    def predict(self, task_params: Params, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, task_params, (x,))

    def export(self, params: Params, batch: EpisodeBatch) -> tuple[nn.Module, torch.Tensor]:
        return materialize(self.model, params), batch.query_x[0]

    def start(self, params: Params, support_x: torch.Tensor, support_y: torch.Tensor) -> Params:
        return params

    def tunable(self, task_params: Params) -> tuple[str, ...]:
        return tuple(task_params) if self.inner_keys is None else self.inner_keys

    def adapt(self, params: Params, support_x: torch.Tensor, support_y: torch.Tensor) -> Params:
        return sgd(self.predict, self.objective, params, self.tunable(params), support_x, support_y,
                   self.inner_steps, self.inner_lr, self.first_order)

    def task_loss(self, params: Params, sx: torch.Tensor, sy: torch.Tensor, qx: torch.Tensor, qy: torch.Tensor):
        """One task's query loss after the inner loop (differentiable in ``params``) and its detached statistics."""
        pred_after = self.predict(self.adapt(params, sx, sy), qx)
        with torch.no_grad():
            pred_before = self.predict(params, qx)
        return self.objective.loss(pred_after, qy), query_stats(self.objective, pred_before, pred_after, qy)

    def task_gradient(self, params: Params, sx: torch.Tensor, sy: torch.Tensor, qx: torch.Tensor, qy: torch.Tensor):
        return gradient_of(self.task_loss)(params, sx, sy, qx, qy)

    def meta_gradient(self, params: Params, batch: EpisodeBatch) -> Summed:
        plain = type(self).task_gradient is MAML.task_gradient  # the gradient of task_loss (not Reptile's θ − φ)
        if plain and self.compile:
            key = ("compiled", self.strategy)
            if key not in self._cache:
                self._cache[key] = compiled_tasks(self.task_gradient, self.strategy)
            return sum_over_tasks(self.task_gradient, params, batch, self.strategy, self._cache[key])
        if plain and self.strategy == "vmap":
            if "batched" not in self._cache:  # all tasks at once without vmap, where the backbone allows
                self._cache["batched"] = batched_losses(self)
            if self._cache["batched"] is not None:
                return sum_of_losses(self._cache["batched"], self.task_loss, params, batch)
        return sum_over_tasks(self.task_gradient, params, batch, self.strategy)


@register
class MAMLConfig(AlgorithmConfig):
    """MAML (second order), FOMAML (first order) and ANIL (inner loop on the head only)."""

    name: Literal["maml", "fomaml", "anil"] = "maml"
    inner_steps: NonNegativeInt = 1
    """SGD steps on the support set in the inner loop."""
    first_order: bool = False
    """Detach inner gradients (implied by fomaml)."""
    compile: bool = False
    """torch.compile the per-task gradient (batched with vmap). Its first step compiles (minutes on a small CPU, see
    benchmarks/throughput.py --compile), so it pays on long runs, and again on the first share of another size."""

    def build(self, parts: Parts) -> MAML:
        return MAML(parts.model, parts.objective, self.inner_steps, self.inner_lr,
                    first_order=self.first_order or self.name == "fomaml",
                    inner_keys=parts.model.head_keys if self.name == "anil" else None,
                    strategy=parts.strategy, name=self.name, compile=self.compile)
