"""A classifier = an embedding network (``features``) followed by a linear ``head`` over n_way classes.

Conv-4 and ResNet-12 both take this shape, which is what lets every algorithm
treat them alike: MAML adapts the head (ANIL) or everything, ProtoNet and
MetaOptNet meta-learn ``features`` and write the head from the support set.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from learners.models.norm import per_set_statistics
from learners.params import Params


class Classifier(nn.Module):
    def __init__(self, features: nn.Module, embedding_dim: int, n_way: int):
        super().__init__()
        self.features = features
        self.embedding_dim = embedding_dim
        self.head = nn.Linear(embedding_dim, n_way)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    @property
    def head_keys(self) -> tuple[str, ...]:
        return ("head.weight", "head.bias")


def feature_params(params: Params) -> Params:
    """The ``features.*`` entries of a classifier's parameters, named as the embedding network names them."""
    return {k.removeprefix("features."): v for k, v in params.items() if k.startswith("features.")}


def embed(model: Classifier, params: Params, x: torch.Tensor) -> torch.Tensor:
    """Embeddings of ``x`` under the ``features`` part of ``params``."""
    return functional_call(model.features, feature_params(params), (x,))


def embed_sets(model: Classifier, params: Params, *sets: torch.Tensor) -> list[torch.Tensor]:
    """Embeddings ``[T, n, D]`` of each ``[T, n, ...]`` set of images (e.g. every task's support set, then every
    task's query set), from ONE pass of ``features`` over all their images, in which batch norm normalizes each
    task's set by its own statistics: per set, what ``embed`` of that set alone computes, up to float rounding."""
    blocks = tuple((s.shape[0], s.shape[1]) for s in sets)
    images = torch.cat([s.reshape(-1, *s.shape[2:]) for s in sets]) if len(sets) > 1 else sets[0].flatten(0, 1)
    with per_set_statistics(blocks):
        flat = embed(model, params, images)
    return [z.view(count, size, -1) for z, (count, size) in zip(flat.split([c * n for c, n in blocks]), blocks)]
