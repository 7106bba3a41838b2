"""iMAML (Rajeswaran et al. 2019): the meta-gradient by implicit differentiation of a regularized inner problem.

The inner problem is φ*(θ) = argmin_φ L_support(φ) + λ/2 |φ − θ|², solved
approximately by ``inner_steps`` gradient steps from θ (the proximal rule of
``learners.inner_update``). At its optimum ∇L_support(φ*) + λ(φ* − θ) = 0, so
dφ*/dθ = (I + H/λ)⁻¹ with H = ∇²L_support(φ*), and a task's meta-gradient is

    v = (I + H/λ)⁻¹ ∇L_query(φ*),

found by ``cg_steps`` of conjugate gradient on Hessian-vector products. The
inner loop is never differentiated through: memory does not grow with
``inner_steps`` (one Hessian-vector product's graph at a time), and compute
grows with them only as their forward/backward passes do. Evaluation adapts
with the same proximal rule.

``inner="pullback"`` runs what the authors' Omniglot code (imaml_dev,
``examples/omniglot_implicit_maml.py``) runs instead of the formula: the inner
steps descend L_support alone, then ONE step of ``inner_lr`` on λ/2 |φ − θ|²
pulls φ back (by ``inner_lr`` · λ of the way to θ), and evaluation adapts with
plain SGD (their test script's λ = 0). ``cg_damping`` and ``lam_damping`` give
their damped system ((1 + cg_damping) I + H / (λ + lam_damping)) v = ∇L_query
(their defaults: 1 and 10). On Omniglot the proximal steps of the formula fit
the support set much less at the same λ, and learn less per meta-step
(docs/results.md, measured against an independent implementation of both).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
from pydantic import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt
from torch.func import grad, vjp

from learners.algorithms.maml import MAML
from learners.inner_loop import descend
from learners.inner_update import InnerUpdate
from learners.objective import query_stats
from learners.params import Params
from learners.registry import AlgorithmConfig, Parts, register


@dataclass
class IMAML(MAML):
    inner_steps: int = 16
    lam: float = 2.0
    cg_steps: int = 5
    inner: str = "proximal"  # "proximal": steps on L_support + λ/2 |φ − θ|²; "pullback": the authors' code
    cg_damping: float = 0.0
    lam_damping: float = 0.0
    name: str = "imaml"

    def __post_init__(self) -> None:
        if self.inner not in ("proximal", "pullback"):
            raise ValueError(f"inner must be 'proximal' or 'pullback', got {self.inner!r}")
        self.update = InnerUpdate(self.inner_lr, proximal=self.lam if self.inner == "proximal" else 0.0)
        super().__post_init__()

    def adapt(self, params: Params, support_x: torch.Tensor, support_y: torch.Tensor) -> Params:
        return self._inner(params, support_x, support_y, first_order=self.first_order)

    def _inner(self, params: Params, sx: torch.Tensor, sy: torch.Tensor, first_order: bool = True) -> Params:
        """φ: the inner steps from θ, then (``pullback``) one step of ``inner_lr`` on λ/2 |φ − θ|²."""
        keys = self._moved_keys()
        phi = descend(self.predict, self.objective, params, params, keys, sx, sy, self.inner_steps, self.update,
                      first_order=first_order)
        if self.inner == "pullback":
            phi = {**phi, **{k: phi[k] - self.inner_lr * self.lam * (phi[k] - params[k]) for k in keys}}
        return phi

    def task_gradient(self, params: Params, sx: torch.Tensor, sy: torch.Tensor, qx: torch.Tensor, qy: torch.Tensor):
        keys = self._moved_keys()
        phi = {k: v.detach() for k, v in self._inner(params, sx, sy).items()}
        point = {k: phi[k] for k in keys}

        def query_loss(sub: Params):
            pred = self.predict({**phi, **sub}, qx)
            return self.objective.loss(pred, qy), pred

        def support_grad(sub: Params) -> Params:
            return grad(lambda s: self.objective.loss(self.predict({**phi, **s}, sx), sy))(sub)

        g, pred_after = grad(query_loss, has_aux=True)(point)
        _, hvp = vjp(support_grad, point)  # the Hessian is symmetric: its vector-Jacobian product is H v
        identity, scale = 1.0 + self.cg_damping, self.lam + self.lam_damping
        v = conjugate_gradient(lambda u: {k: identity * u[k] + w / scale for k, w in hvp(u)[0].items()}, g,
                               self.cg_steps)
        with torch.no_grad():
            pred_before = self.predict(params, qx)
        grads = {k: v[k] if k in v else torch.zeros_like(p) for k, p in params.items()}
        return grads, query_stats(self.objective, pred_before, pred_after, qy)


def conjugate_gradient(matvec: Callable[[Params], Params], b: Params, steps: int) -> Params:
    """``steps`` iterations of conjugate gradient for A x = b from x = 0, A symmetric positive definite given as
    ``matvec``. A fixed number of iterations and no data-dependent branches, so it runs under ``vmap``; a
    residual that reaches exactly zero stops the updates instead of dividing by it."""
    x = {k: torch.zeros_like(v) for k, v in b.items()}
    r, p = b, b
    rr = _dot(r, r)
    for _ in range(steps):
        ap = matvec(p)
        pap = _dot(p, ap)
        alpha = torch.where(pap != 0, rr / pap, torch.zeros_like(pap))
        x = {k: x[k] + alpha * p[k] for k in x}
        r = {k: r[k] - alpha * ap[k] for k in r}
        rr_next = _dot(r, r)
        beta = torch.where(rr != 0, rr_next / rr, torch.zeros_like(rr))
        p = {k: r[k] + beta * p[k] for k in r}
        rr = rr_next
    return x


def _dot(a: Params, b: Params) -> torch.Tensor:
    return sum((a[k] * b[k]).sum() for k in a)


@register
class IMAMLConfig(AlgorithmConfig):
    """iMAML: implicit meta-gradient of a proximally regularized inner problem, by conjugate gradient."""

    name: Literal["imaml"] = "imaml"
    inner_steps: NonNegativeInt = 16
    """Gradient steps on L_support + λ/2 |φ − θ|² (the paper: 16 on Omniglot)."""
    lam: PositiveFloat = 2.0
    """λ, the strength of the pull toward θ (the paper: 2 on Omniglot)."""
    cg_steps: PositiveInt = 5
    """Conjugate-gradient iterations for (I + H/λ) v = ∇L_query (the paper: 5)."""
    inner: Literal["proximal", "pullback"] = "proximal"
    """proximal: the inner steps descend L_support + λ/2 |φ − θ|², and evaluation adapts the same way (the paper's
    formula); pullback: they descend L_support alone, then one step on λ/2 |φ − θ|² pulls φ back, and evaluation
    adapts with plain SGD (the authors' Omniglot code)."""
    cg_damping: NonNegativeFloat = 0.0
    """Added to the identity of the CG system: ((1 + cg_damping) I + H / (λ + lam_damping)) v = ∇L_query (the
    authors' code: 1)."""
    lam_damping: NonNegativeFloat = 0.0
    """Added to λ in the CG system's Hessian term (the authors' code: 10)."""

    def build(self, parts: Parts) -> IMAML:
        return IMAML(parts.model, parts.objective, self.inner_steps, self.inner_lr, strategy=parts.strategy,
                     lam=self.lam, cg_steps=self.cg_steps, inner=self.inner, cg_damping=self.cg_damping,
                     lam_damping=self.lam_damping)
