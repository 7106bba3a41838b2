"""Prototypical networks (Snell et al. 2017): classify queries by distance to class means of the support embeddings.

The meta-parameters are the embedding network's. A task's model is the
embedding followed by a linear head built from the prototypes c_k:

    logits_k(z) = 2 c_k·z − |c_k|²  =  −|z − c_k|² + |z|²

which has the softmax of negative squared Euclidean distances (the ``|z|²``
term is the same for every class). Writing it as a linear head lets test-time
SGD steps fine-tune it like any other head (``tunable``), and lets the same
evaluation and prediction code (``learners.predictor``) serve ProtoNet, MAML and MetaOptNet.

Strategies: per task (``vmap`` or ``loop`` over ``task_gradient``), or ``onepass``: the support and query images
of all the share's tasks in one pass of the embedding network (``embed_sets``), the prototypes and query logits of
every task from those embeddings, one backward (``one_pass_losses``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from learners.heads.support_head import SupportHead
from learners.models.classifier import embed, embed_sets
from learners.objective import after_stats
from learners.params import Params
from learners.registry import AlgorithmConfig, Parts, register
from learners.strategy import Strategy, Summed, gradient_of, sum_in_passes, sum_over_tasks
from tasks.episode import EpisodeBatch


def prototype_head(embedding: torch.Tensor, labels: torch.Tensor, n_way: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight [n_way, D], bias [n_way]) of the linear head equivalent to nearest-prototype classification; with
    leading task axes (embedding [T, S, D], labels [T, S]) one head per task ([T, n_way, D], [T, n_way])."""
    # A comparison rather than F.one_hot, which vmap cannot batch.
    onehot = (labels[..., None] == torch.arange(n_way, device=labels.device)).to(embedding.dtype)
    protos = onehot.mT @ embedding / onehot.sum(-2).clamp_min(1)[..., None]
    return 2 * protos, -(protos**2).sum(-1)


@dataclass
class ProtoNet(SupportHead):
    strategy: Strategy = "vmap"
    name: str = "protonet"
    tasks_per_pass: int | None = None  # onepass: tasks per backbone pass (None: the whole share)

    def start(self, params: Params, support_x: torch.Tensor, support_y: torch.Tensor) -> Params:
        weight, bias = prototype_head(embed(self.model, params, support_x), support_y, self.n_way)
        return {**params, "head.weight": weight, "head.bias": bias}

    def task_loss(self, params: Params, sx: torch.Tensor, sy: torch.Tensor, qx: torch.Tensor, qy: torch.Tensor):
        """One task's query loss (differentiable in ``params``) and its detached statistics."""
        pred = self.predict(self.start(params, sx, sy), qx)
        return self.objective.loss(pred, qy), after_stats(self.objective, pred, qy)

    def task_gradient(self, params: Params, sx: torch.Tensor, sy: torch.Tensor, qx: torch.Tensor, qy: torch.Tensor):
        return gradient_of(self.task_loss)(params, sx, sy, qx, qy)

    def one_pass_losses(self, params: Params, sx: torch.Tensor, sy: torch.Tensor, qx: torch.Tensor,
                        qy: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Every task's query loss [T] and statistics from one backbone pass over all the tasks' images."""
        support, query = embed_sets(self.model, params, sx, qx)
        weight, bias = prototype_head(support, sy, self.n_way)
        logits = torch.baddbmm(bias[:, None], query, weight.mT)
        losses = self.objective.task_losses(logits, qy)
        metrics = self.objective.task_metrics(logits.detach(), qy)
        return losses, {"loss_after": losses.detach(), **{f"{k}_after": v for k, v in metrics.items()}}

    def meta_gradient(self, params: Params, batch: EpisodeBatch) -> Summed:
        if self.strategy == "onepass":
            return sum_in_passes(self.one_pass_losses, self.task_loss, params, batch, self.tasks_per_pass)
        return sum_over_tasks(self.task_gradient, params, batch, self.strategy)


@register
class ProtoNetConfig(AlgorithmConfig):
    name: Literal["protonet"] = "protonet"
    families = ("images",)

    def build(self, parts: Parts) -> ProtoNet:
        return ProtoNet(parts.model, parts.objective, n_way=parts.n_way, strategy=parts.strategy,
                        tasks_per_pass=parts.tasks_per_pass)

    def one_pass(self) -> bool:
        return True
