"""The inner update rule: how one task's parameters move on a support-set gradient (a pluggable piece).

One rule, three ways to choose the step size, each a published algorithm::

    fixed               φ ← φ − α g            MAML, FOMAML, ANIL, Reptile (α = inner_lr)
    per_parameter       φ ← φ − α_p ⊙ g        Meta-SGD (Li et al. 2017): α_p has the shape of φ_p
    per_layer_per_step  φ ← φ − α_{p,s} g      MAML++ LSLR (Antoniou et al. 2019): a scalar per tensor and step

and two additions:

- ``proximal`` λ: g ← g + λ(φ − θ), gradient descent on L_support(φ) + λ/2 |φ − θ|² (iMAML's inner problem);
- ``step_norms``: the norm layers' affine parameters (γ, β) have one set per inner step, and the task model
  uses set s while taking step s and for the query after it (MAML++ "BNWB").

Whatever is learned is an entry of θ (``inner_lr.<name>``, ``step_norm.<name>``), so it is checkpointed,
shipped to workers and exported with the rest of the meta-parameters. Functions here take one task's
tensors and compose with ``torch.func.vmap`` and ``torch.func.grad``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import nn

from learners.params import Params

RATE = "inner_lr."
NORM = "step_norm."
Rates = Literal["fixed", "per_parameter", "per_layer_per_step"]


@dataclass(frozen=True)
class InnerUpdate:
    lr: float
    """The step size (fixed), or the initial value of the learned ones."""
    rates: Rates = "fixed"
    steps: int = 1
    """Inner steps with their own rates and norm sets; later steps (longer test-time adaptation) reuse the last."""
    proximal: float = 0.0
    step_norms: tuple[str, ...] = ()
    """Names of the model's norm-layer affine parameters that get one set per step."""

    def with_lr(self, lr: float) -> InnerUpdate:
        """The same rule with fixed step ``lr`` (test-time fine-tuning); learned rates stay as learned."""
        return replace(self, lr=lr)

    def init(self, model_params: Params, keys: tuple[str, ...]) -> Params:
        """θ from a model's initial parameters: learned rates for the ``keys`` the inner loop moves, and
        ``steps`` copies of each per-step norm parameter in place of the model's one."""
        theta = {k: v for k, v in model_params.items() if k not in self.step_norms}
        for k in self.step_norms:
            v = model_params[k]
            theta[NORM + k] = v.expand(self.steps, *v.shape).clone()
        for k in keys if self.rates != "fixed" else ():
            v = model_params[k]
            shape = v.shape if self.rates == "per_parameter" else (self.steps,)
            theta[RATE + k] = torch.full(shape, self.lr, dtype=v.dtype, device=v.device)
        return theta

    def at_step(self, theta: Params, task: Params, step: int) -> Params:
        """The task parameters in force at inner step ``step``: its set of per-step norm parameters."""
        if not self.step_norms:
            return task
        s = min(step, self.steps - 1)
        return {**task, **{k: theta[NORM + k][s] for k in self.step_norms}}

    def apply(self, theta: Params, task: Params, grads: Params, step: int) -> Params:
        """``task`` after inner step ``step`` with support-loss gradients ``grads`` (one per moved entry)."""
        moved = {}
        for k, g in grads.items():
            if self.proximal:
                g = g + self.proximal * (task[k] - theta[k])
            moved[k] = task[k] - self.rate(theta, k, step) * g
        return {**task, **moved}

    def rate(self, theta: Params, key: str, step: int) -> torch.Tensor | float:
        if self.rates == "fixed":
            return self.lr
        rate = theta[RATE + key]
        return rate[min(step, self.steps - 1)] if self.rates == "per_layer_per_step" else rate


def norm_keys(model: nn.Module) -> tuple[str, ...]:
    """Names of the affine parameters of every batch-norm layer of ``model``."""
    return tuple(f"{prefix}.{name}" for prefix, m in model.named_modules()
                 if isinstance(m, nn.modules.batchnorm._BatchNorm) for name, _ in m.named_parameters(recurse=False))
