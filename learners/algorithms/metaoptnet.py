"""MetaOptNet (Lee et al., CVPR 2019): a convex base learner fitted on the support embeddings classifies the queries.

The meta-parameters are the embedding network's and a learnable output scale
(the paper's temperature). For each task the head is solved, not learned: the
Crammer–Singer multi-class SVM (``head="svm"``, through the batched
QP solver of ``learners.heads.svm_head`` or, as the reference,
cvxpylayers) or ridge regression (``head="ridge"``, R2D2). The meta-gradient
flows through the solver's optimality conditions into the embeddings.

Both heads are linear in the query embedding, logits = q · Wᵀ with
W = αᵀ X_support, so a task's model is again the embedding plus a linear head,
and evaluation, fine-tuning and prediction (``learners.predictor``) are shared with ProtoNet and MAML.

Embeddings are computed task by task (``loop``, ``vmap``), or for all the share's tasks in one pass of the
backbone (``onepass``, ``embed_sets``); either way batch norm uses each task's own statistics, so a task's result
never depends on which other tasks share its meta-batch. The head is then solved for all tasks at once. A task
whose solver fails or does not converge is dropped from the step and counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveFloat, PositiveInt
from torch.func import vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from learners.heads.ridge_head import ridge_dual
from learners.heads.support_head import SupportHead
from learners.heads.svm_head import dual_readout, svm_dual
from learners.models.classifier import embed, embed_sets
from learners.objective import after_stats
from learners.params import Params
from learners.registry import AlgorithmConfig, Parts, register
from learners.strategy import Strategy, Summed, chunks, kept_stats, merged
from tasks.episode import EpisodeBatch


@dataclass
class MetaOptNet(SupportHead):
    head: str = "svm"  # "svm" | "ridge"
    solver: str = "fast"  # "fast" (batched QP, learners.heads.qp) | "cvxpylayers" (reference)
    C: float = 0.1
    lam: float = 50.0
    train_iters: int = 15
    eval_iters: int = 50
    label_smoothing: float = 0.0
    strategy: Strategy = "loop"
    name: str = "metaoptnet-svm"
    tasks_per_pass: int | None = None  # onepass: tasks per backbone pass (None: the whole share)

    def init_params(self, seed: int) -> Params:
        return {**super().init_params(seed), "scale": torch.ones(1)}

    def _embed_tasks(self, params: Params, support_x: torch.Tensor, query_x: torch.Tensor) -> list[torch.Tensor]:
        """[T, n, ...] support and query images -> [T, n, D] embeddings: each set through the network on its own
        (vmap, loop), or all of them in one pass (onepass), each set normalized by its own statistics."""
        if self.strategy == "onepass":
            return embed_sets(self.model, params, support_x, query_x)
        if self.strategy == "vmap":
            return [vmap(lambda xi: embed(self.model, params, xi))(x) for x in (support_x, query_x)]
        return [torch.stack([embed(self.model, params, xi) for xi in x]) for x in (support_x, query_x)]

    def _dual(self, support: torch.Tensor, labels: torch.Tensor, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha [T, S, n_way] and the per-task ``ok`` mask."""
        if self.head == "ridge":
            alpha = ridge_dual(support, labels, self.n_way, self.lam)
            return alpha, alpha.detach().reshape(len(alpha), -1).sum(1).isfinite()
        if self.solver == "cvxpylayers":
            from learners.heads.svm_cvxpy import svm_dual_cvxpy  # the reference path; imports cvxpy only when chosen

            try:
                alpha = svm_dual_cvxpy(support, labels, self.n_way, self.C).to(support.dtype)
            except Exception:  # noqa: BLE001 - a failed conic solve drops the batch's tasks, like a failed IPM
                return torch.zeros(*labels.shape, self.n_way, dtype=support.dtype), torch.zeros(
                    len(labels), dtype=torch.bool)
            return alpha, alpha.detach().reshape(len(alpha), -1).sum(1).isfinite()
        res = svm_dual(support, labels, self.n_way, self.C, max_iter=iters)
        return res.x, res.ok

    def meta_gradient(self, params: Params, batch: EpisodeBatch) -> Summed:
        parts = chunks(batch, self.tasks_per_pass if self.strategy == "onepass" else None)
        return merged([self._meta_gradient(params, part) for part in parts])

    def _meta_gradient(self, params: Params, batch: EpisodeBatch, retry: bool = True) -> Summed:
        leaves, spec = tree_flatten({k: v.detach().requires_grad_() for k, v in params.items()})
        p = tree_unflatten(leaves, spec)
        support, query = self._embed_tasks(p, batch.support_x, batch.query_x)
        # A task whose embeddings are not finite is zeroed before the solve and dropped: it cannot poison the
        # others, which share the batched solver and the backward pass.
        with torch.no_grad():
            finite = support.sum((1, 2)).isfinite() & query.sum((1, 2)).isfinite()
        support = torch.where(finite.view(-1, 1, 1), support, 0.0)
        query = torch.where(finite.view(-1, 1, 1), query, 0.0)
        alpha, ok = self._dual(support, batch.support_y, self.train_iters)
        logits = dual_readout(query, support, alpha) * p["scale"]
        losses = torch.stack([F.cross_entropy(lg, y, label_smoothing=self.label_smoothing)
                              for lg, y in zip(logits, batch.query_y)])
        ok = ok & finite & losses.detach().isfinite()
        kept = int(ok.sum())
        grads = [torch.zeros_like(v) for v in leaves]
        if kept:
            values = torch.autograd.grad(losses[ok].sum(), leaves, allow_unused=True)
            grads = [torch.zeros_like(v) if g is None else g for v, g in zip(leaves, values)]
            if not all(bool(g.sum().isfinite()) for g in grads):  # finite losses, non-finite gradient
                # A dropped task's non-finite activations still meet zero upstream gradients in the backbone's
                # backward (0 * NaN): the kept tasks are computed again without it, once.
                keep = [i for i, f in enumerate(ok.tolist()) if f]
                if retry and len(keep) < len(batch):
                    return _spread(self._meta_gradient(params, batch[keep], retry=False), keep, len(batch))
                grads, kept, ok = [torch.zeros_like(v) for v in leaves], 0, torch.zeros_like(ok)
        per_task = [after_stats(self.objective, lg, y) for lg, y in zip(logits.detach(), batch.query_y)]
        stats = {k: torch.stack([t[k] for t in per_task]) for k in per_task[0]}
        return Summed(tree_unflatten(grads, spec), kept_stats(stats, ok), kept, len(batch) - kept, ok.tolist())

    def start(self, params: Params, support_x: torch.Tensor, support_y: torch.Tensor) -> Params:
        support = embed(self.model, params, support_x)[None]
        alpha, _ = self._dual(support, support_y[None], self.eval_iters)
        weight = (alpha.transpose(1, 2) @ support)[0] * params["scale"]
        body = {k: v for k, v in params.items() if k != "scale"}
        return {**body, "head.weight": weight, "head.bias": torch.zeros(self.n_way, dtype=weight.dtype,
                                                                           device=weight.device)}


def _spread(part: Summed, tasks: list[int], n: int) -> Summed:
    """``part``, computed on the tasks ``tasks`` of a batch of ``n``, as that batch's result: the others dropped."""
    flags = [False] * n
    for i, f in zip(tasks, part.per_task_finite):
        flags[i] = f
    return Summed(part.grads, part.stats, part.tasks, n - part.tasks, flags)


class _MetaOptNetConfig(AlgorithmConfig):
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    """Label smoothing of the query loss."""
    families = ("images",)

    def one_pass(self) -> bool:
        return True


@register
class MetaOptNetSVMConfig(_MetaOptNetConfig):
    """The Crammer-Singer SVM head (MetaOptNet-SVM)."""

    name: Literal["metaoptnet-svm"] = "metaoptnet-svm"
    svm_c: PositiveFloat = 0.1
    """The SVM's C."""
    solver: Literal["fast", "cvxpylayers"] = "fast"
    """Batched QP in torch (fast), or cvxpylayers (the reference it is tested against)."""
    solver_iters: PositiveInt = 15
    """Solver steps while training (active-set steps, then as many interior-point steps)."""
    eval_solver_iters: PositiveInt = 50
    """Solver steps at evaluation."""

    def build(self, parts: Parts) -> MetaOptNet:
        return MetaOptNet(parts.model, parts.objective, parts.n_way, head="svm", solver=self.solver, C=self.svm_c,
                          train_iters=self.solver_iters, eval_iters=self.eval_solver_iters,
                          label_smoothing=self.label_smoothing, strategy=parts.strategy, name=self.name,
                          tasks_per_pass=parts.tasks_per_pass)


@register
class MetaOptNetRidgeConfig(_MetaOptNetConfig):
    """The ridge-regression head (MetaOptNet-RR, R2D2)."""

    name: Literal["metaoptnet-ridge"] = "metaoptnet-ridge"
    ridge_lambda: PositiveFloat = 50.0
    """The ridge penalty."""

    def build(self, parts: Parts) -> MetaOptNet:
        return MetaOptNet(parts.model, parts.objective, parts.n_way, head="ridge", lam=self.ridge_lambda,
                          label_smoothing=self.label_smoothing, strategy=parts.strategy, name=self.name,
                          tasks_per_pass=parts.tasks_per_pass)
