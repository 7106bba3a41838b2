"""Prototypical networks (Snell et al. 2017): classify queries by distance to class means of the support embeddings.

The meta-parameters are the embedding network's. A task's model is the
embedding followed by a linear head built from the prototypes c_k:

    logits_k(z) = 2 c_k·z − |c_k|²  =  −|z − c_k|² + |z|²

which has the softmax of negative squared Euclidean distances (the ``|z|²``
term is the same for every class). Writing it as a linear head lets test-time
SGD steps fine-tune it like any other head (``tunable``), and lets the same
export/evaluation code serve ProtoNet, MAML and MetaOptNet.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch.func import grad

from learners.heads.support_head import SupportHead
from learners.models.classifier import embed
from learners.objective import after_stats
from learners.params import Params
from learners.registry import AlgorithmConfig, Parts, register
from learners.strategy import Strategy, Summed, sum_over_tasks
from tasks.episode import EpisodeBatch


def prototype_head(embedding: torch.Tensor, labels: torch.Tensor, n_way: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight [n_way, D], bias [n_way]) of the linear head equivalent to nearest-prototype classification."""
    # A comparison rather than F.one_hot, which vmap cannot batch.
    onehot = (labels[:, None] == torch.arange(n_way, device=labels.device)).to(embedding.dtype)
    protos = onehot.T @ embedding / onehot.sum(0).clamp_min(1)[:, None]
    return 2 * protos, -(protos**2).sum(1)


@dataclass
class ProtoNet(SupportHead):
    strategy: Strategy = "vmap"
    name: str = "protonet"

    def start(self, params: Params, support_x: torch.Tensor, support_y: torch.Tensor) -> Params:
        weight, bias = prototype_head(embed(self.model, params, support_x), support_y, self.n_way)
        return {**params, "head.weight": weight, "head.bias": bias}

    def task_gradient(self, params: Params, sx: torch.Tensor, sy: torch.Tensor, qx: torch.Tensor, qy: torch.Tensor):
        def query_loss(p: Params):
            pred = self.predict(self.start(p, sx, sy), qx)
            return self.objective.loss(pred, qy), pred

        grads, pred = grad(query_loss, has_aux=True)(params)
        return grads, after_stats(self.objective, pred, qy)

    def meta_gradient(self, params: Params, batch: EpisodeBatch) -> Summed:
        return sum_over_tasks(self.task_gradient, params, batch, self.strategy)


@register
class ProtoNetConfig(AlgorithmConfig):
    name: Literal["protonet"] = "protonet"
    families = ("images",)

    def build(self, parts: Parts) -> ProtoNet:
        return ProtoNet(parts.model, parts.objective, n_way=parts.n_way, strategy=parts.strategy)
