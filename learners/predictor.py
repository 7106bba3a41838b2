"""A meta-trained learner applied to one new task: adapt on its support set, predict its query set.

This is what a run's logged model does (``orchestrator/tracking/pyfunc_model.py`` wraps it for MLflow). It is
rebuilt from a ``Blueprint`` (plain data: the algorithm's config, the backbone, the input shape) and θ, with
``learners`` and ``tasks`` alone, so a model folder that carries those two packages runs anywhere torch does.

>>> predictor = Predictor.build(blueprint, theta)                                      # doctest: +SKIP
>>> predictor.predict(support_x, support_y, query_x)          # the algorithm's own adaptation
>>> predictor.predict(support_x, support_y, query_x, steps=10)  # as evaluation scores "after 10 steps"

Adaptation is the algorithm's own (``adapt``: MAML's inner steps with its rule, ProtoNet's prototypes,
MetaOptNet's solved head, the hypernetwork's generated weights), or with ``steps`` = k the task model before
adaptation fine-tuned k steps at the evaluation's step size, which is exactly what ``metaray eval`` reports
as the score after k steps. Class labels may be any integers: the support set's distinct labels, sorted, are
the model's classes 0..n_way-1, and predictions are given back in the caller's labels.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from learners.algorithm import Algorithm
from learners.inner_loop import fine_tune
from learners.models.build import task_model
from learners.params import Params
from learners.registry import Parts, variant

OWN_ADAPTATION = -1  # as a model parameter (adaptation_steps): the algorithm's own adaptation, not k steps


@dataclass(frozen=True)
class Blueprint:
    """Everything the evaluation's algorithm is built from, but θ; JSON-ready (``to_json``/``from_json``)."""

    algorithm: dict[str, Any]  # the algorithm's config (its registered variant, ``name`` included), as JSON
    backbone: str
    hidden: list[int]
    width: int
    image: dict[str, Any] | None  # images: {"shape": [C, H, W], "invert": bool, "preprocessing": text}; sine: None
    n_way: int | None  # classes per task (images)
    eval_lr: float  # step size of test-time fine-tuning (eval.inner_lr, else algorithm.inner_lr)
    train_classes: int | None = None  # outputs of a pre-training classifier (pretrain), part of θ's shape

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_json(data: dict[str, Any]) -> Blueprint:
        return Blueprint(**data)

    @property
    def x_shape(self) -> tuple[int, ...]:
        """The shape of one input: (C, H, W) for images, (1,) for sine."""
        return tuple(self.image["shape"]) if self.image else (1,)

    def build(self) -> Algorithm:
        model, objective, in_features = task_model(
            self.backbone, hidden=self.hidden, width=self.width,
            image_shape=tuple(self.image["shape"]) if self.image else None, n_way=self.n_way)
        # One task at a time: no vmap needed, and the loop is what every backbone supports.
        return variant(self.algorithm["name"]).model_validate(self.algorithm).build(
            Parts(model, objective, in_features, self.n_way, "loop", train_classes=self.train_classes))


class Predictor:
    def __init__(self, algorithm: Algorithm, params: Params, blueprint: Blueprint):
        self.algorithm, self.params, self.blueprint = algorithm, params, blueprint
        self.classifies = blueprint.n_way is not None

    @staticmethod
    def build(blueprint: Blueprint, params: Params) -> Predictor:
        algorithm = blueprint.build()
        expected = algorithm.init_params(0)
        wrong = [k for k in expected if k not in params or params[k].shape != expected[k].shape]
        # An algorithm with prepare() (pretrain) is logged prepared: θ plus statistics of θ that need the
        # training data (the mean training embedding), which a deployed model does not have.
        extra = sorted(set(params) - set(expected)) if not hasattr(algorithm, "prepare") else []
        if wrong or extra:
            raise ValueError(f"θ does not fit {blueprint.algorithm['name']} with backbone {blueprint.backbone} "
                             f"(e.g. {(wrong or extra)[0]})")
        return Predictor(algorithm, {k: v.to(torch.float32) for k, v in params.items()}, blueprint)

    def predict(self, support_x: np.ndarray, support_y: np.ndarray, query_x: np.ndarray,
                steps: int | None = None) -> np.ndarray:
        """Query predictions after adapting on (support_x, support_y): class labels (images, in the labels of
        ``support_y``) or values ``[Q, 1]`` (sine). ``steps``: None for the algorithm's own adaptation, k >= 0
        for k fine-tuning steps from the task model before adaptation."""
        sx, qx = self._inputs(support_x, "support_x"), self._inputs(query_x, "query_x")
        classes = None
        if self.classifies:
            classes, sy = self._labels(support_y)
        else:
            sy = torch.as_tensor(np.asarray(support_y, dtype=np.float32)).reshape(-1, 1)
        if len(sy) != len(sx):
            raise ValueError(f"support_y has {len(sy)} entries for {len(sx)} support inputs; give one per input")
        if steps is None:
            task = self.algorithm.adapt(self.params, sx, sy)
        else:
            if steps < 0:
                raise ValueError(f"steps must be >= 0 (or None for the algorithm's own adaptation), got {steps}")
            task = fine_tune(self.algorithm, self.params, sx, sy, steps, self.blueprint.eval_lr)
        with torch.no_grad():
            out = self.algorithm.predict({k: v.detach() for k, v in task.items()}, qx)
        if classes is None:
            return out.numpy().astype(np.float32)
        return classes[out.argmax(-1).numpy()]

    def _inputs(self, x: np.ndarray, name: str) -> torch.Tensor:
        x = np.asarray(x, dtype=np.float32)
        shape = self.blueprint.x_shape
        if x.ndim == len(shape):  # a single input
            x = x[None]
        if tuple(x.shape[1:]) != shape or len(x) == 0:
            raise ValueError(f"{name} has shape {list(x.shape)}; this model takes [N, {', '.join(map(str, shape))}]"
                             + (" (pixels scaled to [0, 1])" if self.blueprint.image else ""))
        return torch.from_numpy(np.ascontiguousarray(x))

    def _labels(self, y: np.ndarray) -> tuple[np.ndarray, torch.Tensor]:
        y = np.asarray(y).reshape(-1)
        classes, index = np.unique(y, return_inverse=True)
        if len(classes) != self.blueprint.n_way:
            raise ValueError(f"the support set has {len(classes)} classes; this model was meta-trained for "
                             f"{self.blueprint.n_way}-way tasks: give {self.blueprint.n_way} classes")
        return classes, torch.as_tensor(index, dtype=torch.int64)
