"""MetaOptNet (Lee et al., CVPR 2019): a convex base learner fitted on the support embeddings classifies the queries.

The meta-parameters are the embedding network's and a learnable output scale
(the paper's temperature). For each task the head is solved, not learned: the
Crammer–Singer multi-class SVM (``head="svm"``, through the batched
QP solver of ``learners.svm_head`` or, as the reference,
cvxpylayers) or ridge regression (``head="ridge"``, R2D2). The meta-gradient
flows through the solver's optimality conditions into the embeddings.

Both heads are linear in the query embedding, logits = q · Wᵀ with
W = αᵀ X_support, so a task's model is again the embedding plus a linear head,
and evaluation, fine-tuning and export are shared with ProtoNet and MAML.

Embeddings are computed task by task (batch norm uses each task's own
statistics, so a task's result never depends on which other tasks share its
meta-batch); the head is then solved for all tasks at once. A task whose solver
fails or does not converge is dropped from the step and counted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.func import functional_call, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from learners.classifier import Classifier, embed, feature_params
from learners.maml import after_stats
from learners.objective import Objective
from learners.params import Params, init_params, materialize
from learners.ridge_head import ridge_dual
from learners.strategy import Strategy, Summed
from learners.svm_head import dual_readout, svm_dual
from tasks.episode import EpisodeBatch


@dataclass
class MetaOptNet:
    model: Classifier
    objective: Objective
    n_way: int
    head: str = "svm"  # "svm" | "ridge"
    solver: str = "fast"  # "fast" (batched QP, learners.qp) | "cvxpylayers" (reference)
    C: float = 0.1
    lam: float = 50.0
    train_iters: int = 15
    eval_iters: int = 50
    label_smoothing: float = 0.0
    strategy: Strategy = "loop"
    name: str = "metaoptnet-svm"

    def init_params(self, seed: int) -> Params:
        params = {k: v for k, v in init_params(self.model, seed).items() if k not in self.model.head_keys}
        params["scale"] = torch.ones(1)
        return params

    def _embed_tasks(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        """[T, n, ...] images -> [T, n, D] embeddings, each task through the network on its own."""
        if self.strategy == "vmap":
            return vmap(lambda xi: embed(self.model, params, xi))(x)
        return torch.stack([embed(self.model, params, xi) for xi in x])

    def _dual(self, support: torch.Tensor, labels: torch.Tensor, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha [T, S, n_way] and the per-task ``ok`` mask."""
        if self.head == "ridge":
            alpha = ridge_dual(support, labels, self.n_way, self.lam)
            return alpha, alpha.detach().reshape(len(alpha), -1).sum(1).isfinite()
        if self.solver == "cvxpylayers":
            from learners.svm_cvxpy import svm_dual_cvxpy  # the reference path; imports cvxpy only when chosen

            try:
                alpha = svm_dual_cvxpy(support, labels, self.n_way, self.C).to(support.dtype)
            except Exception:  # noqa: BLE001 - a failed conic solve drops the batch's tasks, like a failed IPM
                return torch.zeros(*labels.shape, self.n_way, dtype=support.dtype), torch.zeros(
                    len(labels), dtype=torch.bool)
            return alpha, alpha.detach().reshape(len(alpha), -1).sum(1).isfinite()
        res = svm_dual(support, labels, self.n_way, self.C, max_iter=iters)
        return res.x, res.ok

    def meta_gradient(self, params: Params, batch: EpisodeBatch) -> Summed:
        leaves, spec = tree_flatten({k: v.detach().requires_grad_() for k, v in params.items()})
        p = tree_unflatten(leaves, spec)
        support = self._embed_tasks(p, batch.support_x)
        query = self._embed_tasks(p, batch.query_x)
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
                grads, kept, ok = [torch.zeros_like(v) for v in leaves], 0, torch.zeros_like(ok)
        stats: dict[str, float] = {}
        for lg, y, keep in zip(logits.detach(), batch.query_y, ok.tolist()):
            if keep:
                for k, v in after_stats(self.objective, lg, y).items():
                    stats[k] = stats.get(k, 0.0) + float(v)
        return Summed(tree_unflatten(grads, spec), stats, kept, len(batch) - kept, ok.tolist())

    def start(self, params: Params, support_x: torch.Tensor, support_y: torch.Tensor) -> Params:
        support = embed(self.model, params, support_x)[None]
        alpha, _ = self._dual(support, support_y[None], self.eval_iters)
        weight = (alpha.transpose(1, 2) @ support)[0] * params["scale"]
        body = {k: v for k, v in params.items() if k != "scale"}
        return {**body, "head.weight": weight, "head.bias": torch.zeros(self.n_way, dtype=weight.dtype,
                                                                           device=weight.device)}

    adapt = start

    def tunable(self, task_params: Params) -> tuple[str, ...]:
        return self.model.head_keys

    def predict(self, task_params: Params, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, task_params, (x,))

    def export(self, params: Params, batch: EpisodeBatch):
        return materialize(self.model.features, feature_params(params)), batch.query_x[0]
