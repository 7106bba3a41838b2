"""Adding an algorithm takes one file: a toy algorithm registered here alone trains in-process and on Ray."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest
import torch
from pydantic import PositiveFloat
from torch.func import functional_call, grad

from conftest import flat, tiny_config
from learners.objective import query_stats
from learners.params import init_params
from learners.registry import AlgorithmConfig, Parts, register, variants
from learners.strategy import sum_over_tasks
from orchestrator import train
from orchestrator.build import build_algorithm
from orchestrator.config import ConfigError, parse_config


@dataclass
class ShrunkGradient:
    """A toy learner: the meta-gradient of a task is its query-loss gradient at θ, times ``shrink``."""

    model: torch.nn.Module
    objective: object
    shrink: float
    strategy: str = "vmap"
    name: str = "toy-shrink"

    def init_params(self, seed):
        return init_params(self.model, seed)

    def predict(self, task_params, x):
        return functional_call(self.model, task_params, (x,))

    def start(self, params, support_x, support_y):
        return params

    adapt = start

    def tunable(self, task_params):
        return tuple(task_params)

    def task_gradient(self, params, sx, sy, qx, qy):
        g = grad(lambda p: self.objective.loss(self.predict(p, qx), qy))(params)
        with torch.no_grad():
            pred = self.predict(params, qx)
        return {k: self.shrink * v for k, v in g.items()}, query_stats(self.objective, pred, pred, qy)

    def meta_gradient(self, params, batch):
        return sum_over_tasks(self.task_gradient, params, batch, self.strategy)


@register
class ShrunkGradientConfig(AlgorithmConfig):
    name: Literal["toy-shrink"] = "toy-shrink"
    shrink: PositiveFloat = 0.5

    def build(self, parts: Parts) -> ShrunkGradient:
        return ShrunkGradient(parts.model, parts.objective, self.shrink, parts.strategy)


def toy(tmp_path, mode):
    return tiny_config(tmp_path / mode, algorithm={"name": "toy-shrink", "shrink": 0.25},
                       workers={"mode": mode, "num_workers": 2})


def test_the_config_takes_the_toy_and_only_its_keys():
    assert variants()["toy-shrink"] is ShrunkGradientConfig
    cfg = parse_config({"algorithm": {"name": "toy-shrink", "shrink": 2.0}})
    assert cfg.algorithm.shrink == 2.0 and "algorithm.inner_steps" not in cfg.flat()
    with pytest.raises(ConfigError, match="algorithm.inner_steps: unknown key"):
        parse_config({"algorithm": {"name": "toy-shrink", "inner_steps": 3}})


@pytest.mark.usefixtures("ray_local")
def test_the_toy_trains_in_process_and_on_ray_alike(tmp_path):
    cfg = toy(tmp_path, "inprocess")
    local = train(cfg, evaluate=False)
    remote = train(toy(tmp_path, "ray"), evaluate=False)  # the workers import this file to build the toy
    assert isinstance(build_algorithm(cfg), ShrunkGradient)
    assert not torch.equal(flat(local.params), flat(build_algorithm(cfg).init_params(0)))  # it trained
    rel = float((flat(remote.params) - flat(local.params)).norm() / flat(local.params).norm())
    assert rel <= 1e-6, rel
