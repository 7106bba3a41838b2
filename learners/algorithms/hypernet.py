"""A black-box hypernetwork learner: a DeepSet reads the support set and writes the task model's weights.

    h_i = enc([x_i, y_i])         per support pair
    w   = base + dec(mean_i h_i)  all weights of the task model, e.g. the 1-40-40-1 sine MLP

The meta-parameters are the hypernetwork's (encoder, decoder, ``base``); the
meta-gradient of a task is the gradient of its query loss through the generated
weights. Mean pooling makes the output invariant to the order of the support
set and defined for any number of shots. At test time the generated weights can
additionally be fine-tuned with SGD on the support set (``evaluate`` steps > 0).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import PositiveInt
from torch import nn
from torch.func import functional_call, grad

from learners.objective import Objective, query_stats
from learners.params import Params, ParamSpec, init_params
from learners.registry import AlgorithmConfig, Parts, register
from learners.strategy import Strategy, Summed, sum_over_tasks
from tasks.episode import EpisodeBatch


class DeepSet(nn.Module):
    def __init__(self, in_features: int, width: int, out_features: int):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(in_features, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())
        self.dec = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, out_features))
        self.base = nn.Parameter(torch.zeros(out_features))

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        return self.base + self.dec(self.enc(pairs).mean(0))


@dataclass
class HyperNetwork:
    target: nn.Module
    objective: Objective
    in_features: int
    width: int = 64
    strategy: Strategy = "vmap"
    name: str = "hypernet"
    _spec: ParamSpec = field(init=False)
    _net: DeepSet = field(init=False)

    def __post_init__(self) -> None:
        self._spec = ParamSpec.of(init_params(self.target, 0))
        with torch.device("meta"):  # structure only: parameters come from init_params
            self._net = DeepSet(self.in_features, self.width, self._spec.numel)

    def init_params(self, seed: int) -> Params:
        params = init_params(self._net, seed)
        # Start as a plain randomly initialized task model: base = a normal init, the decoder's last layer 0.
        params["base"] = self._spec.flatten(init_params(self.target, seed + 1))
        params["dec.2.weight"] = torch.zeros_like(params["dec.2.weight"])
        params["dec.2.bias"] = torch.zeros_like(params["dec.2.bias"])
        return params

    def predict(self, task_params: Params, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.target, task_params, (x,))

    def start(self, params: Params, support_x: torch.Tensor, support_y: torch.Tensor) -> Params:
        return self.adapt(params, support_x, support_y)

    def tunable(self, task_params: Params) -> tuple[str, ...]:
        return self._spec.names

    def adapt(self, params: Params, support_x: torch.Tensor, support_y: torch.Tensor) -> Params:
        return self._spec.unflatten(functional_call(self._net, params, (_pairs(support_x, support_y),)))

    def task_gradient(self, params: Params, sx: torch.Tensor, sy: torch.Tensor, qx: torch.Tensor, qy: torch.Tensor):
        def query_loss(p: Params):
            pred = self.predict(self.adapt(p, sx, sy), qx)
            return self.objective.loss(pred, qy), pred

        grads, pred_after = grad(query_loss, has_aux=True)(params)
        with torch.no_grad():
            pred_before = self.predict(self._spec.unflatten(params["base"]), qx)
        return grads, query_stats(self.objective, pred_before, pred_after, qy)

    def meta_gradient(self, params: Params, batch: EpisodeBatch) -> Summed:
        return sum_over_tasks(self.task_gradient, params, batch, self.strategy)


def _pairs(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One row [x_i, y_i] per support point: what the DeepSet reads."""
    return torch.cat([x.reshape(len(x), -1), y.reshape(len(y), -1)], dim=1)


@register
class HyperNetConfig(AlgorithmConfig):
    name: Literal["hypernet"] = "hypernet"
    hyper_width: PositiveInt = 64
    """Width of the DeepSet's layers."""
    families = ("sine",)

    def build(self, parts: Parts) -> HyperNetwork:
        # The task model's output joins its input in each support pair the DeepSet reads.
        return HyperNetwork(parts.model, parts.objective, in_features=parts.in_features + 1, width=self.hyper_width,
                            strategy=parts.strategy)
