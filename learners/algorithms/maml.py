"""MAML (Finn et al. 2017) with its first-order (FOMAML), head-only (ANIL, Raghu et al. 2020) and MAML++
(Antoniou et al. 2019) variants, and memory-bounded second order.

One class: first order is a flag, ANIL is the set of parameters the inner loop
touches (``inner_keys`` = the head), and how a step moves them is the
``InnerUpdate`` rule (plain SGD; Meta-SGD's and MAML++'s learned rates and
per-step batch norm). The meta-gradient of a task is
d/dθ L_query(adapt(θ, support)), differentiated straight through the inner
steps with ``torch.func.grad`` (second order), or with the inner gradients
detached (first order: the query gradient at the adapted point).

MAML++ options: learned per-layer per-step rates (LSLR) and per-step batch-norm
affine parameters live in θ; the multi-step loss weights the query loss after
every inner step, annealed toward the last one; derivative-order annealing is
first order for the first meta-steps. The last two depend on the meta-step:
``for_step(step)`` returns the algorithm as configured for it.

``checkpoint_inner`` recomputes each inner step in the backward pass
(``torch.utils.checkpoint``, non-reentrant): memory grows with one step's
graph plus one copy of the parameters per step, not with every step's graph.
``torch.func`` transforms refuse checkpointing's saved-tensor hooks, so this
path differentiates with ``torch.autograd`` one task at a time; it is tested
equal to the plain path.

ANIL's body is the same function of θ for every task (the inner loop moves the head only), so plain ANIL also
runs ``onepass``: the support and query images of all the share's tasks in one pass of the body
(``embed_sets``), then every task's inner loop on the head over those embeddings (``maml_batched``).

>>> from learners.models.mlp import MLP
>>> from learners.objective import MSE
>>> maml = MAML(MLP(1, [40, 40], 1), MSE(), inner_steps=1, inner_lr=0.01)
>>> theta = maml.init_params(seed=0)
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from pydantic import NonNegativeInt, model_validator
from torch import nn
from torch.func import functional_call
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.checkpoint import checkpoint

from learners.algorithms.maml_batched import batched_losses, linear_heads
from learners.inner_loop import descend, inner_step
from learners.inner_update import InnerUpdate, norm_keys
from learners.models.classifier import Classifier, embed_sets
from learners.objective import Objective, query_stats
from learners.params import Params, init_params
from learners.registry import AlgorithmConfig, Parts, register
from learners.strategy import (
    LossFn,
    Strategy,
    Summed,
    compiled_tasks,
    gradient_of,
    sum_in_passes,
    sum_of_losses,
    sum_over_tasks,
)
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
    update: InnerUpdate | None = None  # None: plain SGD with step inner_lr
    loss_weights: tuple[float, ...] | None = None  # query-loss weight per inner step; None: the last step's only
    multi_step_until: int = 0  # MAML++ multi-step loss for meta-steps below this (see for_step)
    first_order_until: int = 0  # MAML++ derivative-order annealing: first order for meta-steps below this
    checkpoint_inner: bool = False
    compile: bool = False  # torch.compile the per-task gradient (batched with vmap): pays over long runs only
    tasks_per_pass: int | None = None  # onepass: tasks per backbone pass (None: the whole share)
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.update is None:
            self.update = InnerUpdate(self.inner_lr)
        self._model_keys = tuple(name for name, _ in self.model.named_parameters())

    def for_step(self, step: int) -> MAML:
        """This algorithm as configured for meta-step ``step`` (MAML++'s annealed schedules); ``self`` if none."""
        if not (self.multi_step_until or self.first_order_until):
            return self
        weights = multi_step_weights(self.inner_steps, step / self.multi_step_until) \
            if step < self.multi_step_until else None
        return replace(self, first_order=self.first_order or step < self.first_order_until, loss_weights=weights)

    def init_params(self, seed: int) -> Params:
        return self.update.init(init_params(self.model, seed), self._moved_keys())

    def predict(self, task_params: Params, x: torch.Tensor) -> torch.Tensor:
        # Task parameters may carry the rule's entries of θ (rates, per-step norms): the model takes its own.
        return functional_call(self.model, {k: task_params[k] for k in self._model_keys}, (x,))

    def start(self, params: Params, support_x: torch.Tensor, support_y: torch.Tensor) -> Params:
        return self.update.at_step(params, params, 0)

    def tunable(self, task_params: Params) -> tuple[str, ...]:
        return self._moved_keys()

    def _moved_keys(self) -> tuple[str, ...]:
        if self.inner_keys is not None:
            return self.inner_keys
        return tuple(k for k in self._model_keys if k not in self.update.step_norms)

    def adapt(self, params: Params, support_x: torch.Tensor, support_y: torch.Tensor) -> Params:
        return descend(self.predict, self.objective, params, self.start(params, support_x, support_y),
                       self._moved_keys(), support_x, support_y, self.inner_steps, self.update, self.first_order)

    def meta_loss(self, params: Params, sx: torch.Tensor, sy: torch.Tensor, qx: torch.Tensor, qy: torch.Tensor,
                  checkpointed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """One task's outer objective and its final query predictions: the query loss after the inner loop, or
        with ``loss_weights`` the weighted sum of the query losses after each inner step (MAML++)."""
        task = self.start(params, sx, sy)
        keys = self._moved_keys()
        last = self.inner_steps - 1
        if last < 0:
            pred = self.predict(task, qx)
            return self.objective.loss(pred, qy), pred
        total = 0.0
        for s in range(self.inner_steps):
            args = (self.predict, self.objective, params, task, keys, sx, sy, s, self.update, self.first_order)
            task = checkpoint(inner_step, *args, autograd=True, use_reentrant=False) if checkpointed \
                else inner_step(*args)
            weight = self.loss_weights[s] if self.loss_weights else float(s == last)
            if weight or s == last:
                loss, pred = checkpoint(self._query, task, qx, qy, use_reentrant=False) if checkpointed \
                    else self._query(task, qx, qy)
                total = total + weight * loss
        return total, pred

    def _query(self, task: Params, qx: torch.Tensor, qy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pred = self.predict(task, qx)
        return self.objective.loss(pred, qy), pred

    def task_loss(self, params: Params, sx: torch.Tensor, sy: torch.Tensor, qx: torch.Tensor, qy: torch.Tensor):
        """One task's meta-loss (differentiable in ``params``) and its detached query statistics."""
        loss, pred_after = self.meta_loss(params, sx, sy, qx, qy)
        with torch.no_grad():
            pred_before = self.predict(self.start(params, sx, sy), qx)
        return loss, query_stats(self.objective, pred_before, pred_after.detach(), qy)

    def task_gradient(self, params: Params, sx: torch.Tensor, sy: torch.Tensor, qx: torch.Tensor, qy: torch.Tensor):
        if not self.checkpoint_inner:
            return gradient_of(self.task_loss)(params, sx, sy, qx, qy)
        grads, pred_after = self._checkpointed_gradient(params, sx, sy, qx, qy)
        with torch.no_grad():
            pred_before = self.predict(self.start(params, sx, sy), qx)
        return grads, query_stats(self.objective, pred_before, pred_after, qy)

    def _checkpointed_gradient(self, params: Params, sx, sy, qx, qy) -> tuple[Params, torch.Tensor]:
        leaves, spec = tree_flatten({k: v.detach().requires_grad_() for k, v in params.items()})
        with torch.enable_grad():
            loss, pred = self.meta_loss(tree_unflatten(leaves, spec), sx, sy, qx, qy, checkpointed=True)
            values = torch.autograd.grad(loss, leaves, allow_unused=True)
        grads = [torch.zeros_like(v) if g is None else g for v, g in zip(leaves, values)]
        return tree_unflatten(grads, spec), pred.detach()

    def meta_gradient(self, params: Params, batch: EpisodeBatch) -> Summed:
        plain = type(self).task_gradient is MAML.task_gradient and not self.checkpoint_inner  # not Reptile's θ − φ
        if plain and self.compile:
            key = ("compiled", self.strategy)
            if key not in self._cache:
                self._cache[key] = compiled_tasks(self.task_gradient, self.strategy)
            return sum_over_tasks(self.task_gradient, params, batch, self.strategy, self._cache[key])
        if self.strategy == "onepass":
            if "onepass" not in self._cache:
                self._cache["onepass"] = self.one_pass_losses()
            if self._cache["onepass"] is None:
                raise ValueError(f"{self.name}: the onepass strategy needs plain ANIL (SGD at a fixed rate on the "
                                 "head of a classifier, the last query loss); use vmap or loop")
            return sum_in_passes(self._cache["onepass"], self.task_loss, params, batch, self.tasks_per_pass)
        if plain and self.strategy == "vmap":
            if "batched" not in self._cache:  # all tasks at once without vmap, where the backbone allows
                self._cache["batched"] = self.task_batched_losses()
            if self._cache["batched"] is not None:
                return sum_of_losses(self._cache["batched"], self.task_loss, params, batch)
        return sum_over_tasks(self.task_gradient, params, batch, self.strategy)

    def task_batched_losses(self) -> LossFn | None:
        """Every task's meta-loss at once without vmap (``maml_batched``), or None: only for plain MAML, FOMAML
        and ANIL (fixed-rate SGD, the last query loss; not a subclass, which computes something else) on a
        backbone with ``forward_tasks``."""
        forward = getattr(self.model, "forward_tasks", None)
        plain = self._plain() and self.update == InnerUpdate(self.inner_lr)
        if forward is None or not hasattr(self.objective, "task_losses") or not plain:
            return None
        return batched_losses(forward, self.objective, self._moved_keys(), self.inner_steps, self.inner_lr,
                              self.first_order)

    def one_pass_losses(self) -> LossFn | None:
        """Plain ANIL's meta-losses of all tasks from one pass of the body over every task's support and query
        images (the body's output does not change in the inner loop), the head's inner loop batched over tasks;
        None where the algorithm is not plain ANIL on a classifier."""
        model = self.model
        if not (isinstance(model, Classifier) and self.inner_keys == model.head_keys and self._plain()):
            return None
        head = batched_losses(linear_heads, self.objective, self.inner_keys, self.inner_steps, self.inner_lr,
                              self.first_order)

        def losses(params: Params, sx: torch.Tensor, sy: torch.Tensor, qx: torch.Tensor, qy: torch.Tensor):
            support, query = embed_sets(model, params, sx, qx)
            return head({k: params[k] for k in self.inner_keys}, support, sy, query, qy)

        return losses

    def _plain(self) -> bool:
        """Plain MAML, FOMAML or ANIL: SGD at the fixed rate inner_lr, the last query loss, no subclass."""
        u = self.update
        return (type(self) is MAML and u.rates == "fixed" and u.lr == self.inner_lr and not u.step_norms
                and not u.proximal and self.loss_weights is None
                and not (self.multi_step_until or self.first_order_until or self.checkpoint_inner))


def multi_step_weights(steps: int, progress: float) -> tuple[float, ...]:
    """MAML++'s query-loss weight per inner step, ``progress`` (0..1) through the annealing: uniform at 0,
    then the earlier steps' weights fall linearly to a floor of 0.03/steps while the last step's rises."""
    floor = 0.03 / steps
    early = max((1.0 - progress) / steps, floor)
    final = min((1.0 + (steps - 1) * progress) / steps, 1.0 - (steps - 1) * floor)
    return (early,) * (steps - 1) + (final,)


@register
class MAMLConfig(AlgorithmConfig):
    """MAML (second order), FOMAML (first order) and ANIL (inner loop on the head only), with the MAML++ options."""

    name: Literal["maml", "fomaml", "anil"] = "maml"
    inner_steps: NonNegativeInt = 1
    """SGD steps on the support set in the inner loop."""
    first_order: bool = False
    """Detach inner gradients (always true for fomaml)."""
    lslr: bool = False
    """MAML++: learn one step size per parameter tensor and inner step (initialized to inner_lr), part of θ; at
    evaluation steps beyond inner_steps reuse the last step's."""
    multi_step_loss: NonNegativeInt = 0
    """MAML++: for the first N meta-steps the meta-loss weights the query loss after every inner step, the weights
    annealed toward the last step over those N; after them (and with 0) only the last step's loss counts."""
    first_order_steps: NonNegativeInt = 0
    """MAML++ derivative-order annealing: first order for the first N meta-steps, then second order."""
    per_step_bn: bool = False
    """MAML++: one set of batch-norm affine parameters per inner step, meta-learned (not adapted), part of θ."""
    compile: bool = False
    """torch.compile the per-task gradient (batched with vmap). Its first step compiles (minutes on a small CPU, see
    benchmarks/throughput.py --compile), so it pays on long runs, and again on the first share of another size."""
    checkpoint_inner: bool = False
    """Recompute each inner step in the backward pass: second-order memory of one step instead of all of them, for
    ~1.3-1.5x the compute. Runs tasks one at a time (strategy loop)."""

    @model_validator(mode="before")
    @classmethod
    def _fomaml_is_first_order(cls, data: Any) -> Any:
        # The effective value, so that the config (and the run's params) say what runs.
        if isinstance(data, dict) and data.get("name") == "fomaml":
            return {**data, "first_order": True}
        return data

    def one_pass(self) -> bool:
        return (self.name == "anil" and not (self.lslr or self.per_step_bn or self.multi_step_loss
                                             or self.first_order_steps or self.checkpoint_inner or self.compile))

    def build(self, parts: Parts) -> MAML:
        inner_keys = parts.model.head_keys if self.name == "anil" else None
        norms = norm_keys(parts.model) if self.per_step_bn else ()
        update = InnerUpdate(self.inner_lr, "per_layer_per_step" if self.lslr else "fixed",
                             max(1, self.inner_steps), step_norms=norms)
        return MAML(parts.model, parts.objective, self.inner_steps, self.inner_lr,
                    first_order=self.first_order or self.name == "fomaml", inner_keys=inner_keys,
                    strategy="loop" if self.checkpoint_inner else parts.strategy, name=self.name, update=update,
                    multi_step_until=self.multi_step_loss, first_order_until=self.first_order_steps,
                    checkpoint_inner=self.checkpoint_inner, compile=self.compile, tasks_per_pass=parts.tasks_per_pass)

    def check(self, cfg) -> list[str]:
        errors = []
        if self.lslr and cfg.eval.inner_lr is not None:
            errors.append("eval.inner_lr: with algorithm.lslr the evaluation adapts with the learned rates; "
                          "leave eval.inner_lr out")
        if self.per_step_bn and cfg.model.backbone == "mlp":
            errors.append("algorithm.per_step_bn: the mlp backbone has no batch norm; use conv4 or resnet12, or "
                          "set per_step_bn: false")
        if (self.lslr or self.per_step_bn) and self.inner_steps == 0:
            errors.append("algorithm.inner_steps: lslr and per_step_bn need at least one inner step")
        if self.checkpoint_inner and self.strategy == "vmap":
            errors.append("algorithm.strategy: checkpoint_inner runs tasks one at a time; use loop or auto")
        return errors
