"""Pre-training as an ordinary classifier, then a task solver on the frozen embedding: the image baseline of
Chen et al. 2019 ("Baseline"), SimpleShot (Wang et al. 2019) and RFS (Tian et al. 2020).

Training: θ is the embedding network plus a linear classifier over ALL classes of the training split, trained
with cross-entropy on minibatches of images with their split-global labels (``tasks.minibatch``): each task of a
meta-step is one batch of ``images_per_task`` images (batch norm normalizes each batch by itself), and the
meta-batch of ``outer.meta_batch_size`` tasks is one minibatch of their product, whose mean gradient the learner
takes. So the batches are seed-addressed, split into shares and summed exactly like episodes.

Test: the classifier is dropped, and each episode's head is written from its support embeddings by ``solver``:

- ``centroid``: nearest class mean (SimpleShot "CL2N": embeddings centred by the mean embedding of the training
  images, then L2-normalized), as the linear head of ProtoNet, logits ``scale · (2 c·z − |c|²)``;
- ``logistic``: multinomial logistic regression with C = ``logistic_c`` (RFS: C = 1 on normalized embeddings),
  ``learners.heads.logistic_head``;
- ``ridge`` / ``svm``: MetaOptNet's ridge-regression and Crammer-Singer SVM heads (``learners.heads``) on the
  frozen embeddings.

``center`` and ``normalize`` choose the embedding transform for every solver. The mean training embedding is a
statistic of θ, not a parameter: ``prepare`` computes it before a batch of episodes is adapted, from a fixed
sample of the training images (``center_batches`` batches, unaugmented, the same for every run), and carries it
as the entry ``center`` of the task parameters. Test-time SGD steps (``eval.steps`` > 0) then fine-tune the
written head (``fine_tune: head``) or the head and the embedding (``all``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch
from pydantic import Field, PositiveFloat, PositiveInt
from torch import nn
from torch.func import grad

from learners.heads.logistic_head import logistic_fit
from learners.heads.ridge_head import ridge_dual
from learners.heads.svm_head import svm_dual
from learners.models.classifier import Classifier, embed
from learners.objective import Objective, after_stats
from learners.params import Params, init_params
from learners.registry import AlgorithmConfig, Parts, register
from learners.strategy import Strategy, Summed, sum_over_tasks
from tasks.episode import EpisodeBatch, EpisodeIds, Purpose

CENTER = "center"  # the mean training embedding, an entry of the task parameters (not of θ)
SOLVERS = ("centroid", "logistic", "ridge", "svm")


class _Pretraining(nn.Module):
    """The embedding followed by the classifier over every training class: what θ parametrizes."""

    def __init__(self, features: nn.Module, embedding_dim: int, classes: int):
        super().__init__()
        self.features = features
        self.classifier = nn.Linear(embedding_dim, classes)


@dataclass
class Pretrain:
    model: Classifier  # the task model: the embedding and an n_way head, written from each support set
    objective: Objective
    n_way: int
    classes: int  # outputs of the pre-training classifier: the training split's classes
    solver: str = "centroid"
    center: bool = True
    normalize: bool = True
    logit_scale: float = 10.0
    logistic_c: float = 1.0
    ridge_lambda: float = 1.0
    svm_c: float = 0.1
    svm_iters: int = 50
    fine_tune: str = "head"
    center_batches: int = 64
    training_images: Callable[[], Any] | None = None
    strategy: Strategy = "loop"
    name: str = "pretrain"
    _mean: tuple[bytes, torch.Tensor] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {self.solver!r}")
        with torch.device("meta"):
            self._net = _Pretraining(self.model.features, self.model.embedding_dim, self.classes)

    def init_params(self, seed: int) -> Params:
        return init_params(self._net, seed)

    # -- training ------------------------------------------------------------------------------------------

    def logits(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        """The pre-training classifier's logits over every training class."""
        return embed(self.model, params, x) @ params["classifier.weight"].T + params["classifier.bias"]

    def task_gradient(self, params: Params, sx: torch.Tensor, sy: torch.Tensor, qx: torch.Tensor, qy: torch.Tensor):
        """One batch's gradient: ``sx``, ``sy`` are its images and global labels (a batch has no query set)."""
        def loss(p: Params):
            out = self.logits(p, sx)
            return self.objective.loss(out, sy), out

        grads, out = grad(loss, has_aux=True)(params)
        # The batch's own loss and accuracy before the step: there is no adaptation while pre-training.
        return grads, after_stats(self.objective, out, sy, "before")

    def meta_gradient(self, params: Params, batch: EpisodeBatch) -> Summed:
        return sum_over_tasks(self.task_gradient, params, batch, self.strategy)

    # -- test: a head written from the support set on the frozen embedding ----------------------------------

    def prepare(self, params: Params) -> Params:
        """``params`` plus the mean training embedding (``center``), once before a batch of episodes."""
        return {**params, CENTER: self.mean_embedding(params)} if self.center else params

    def mean_embedding(self, params: Params) -> torch.Tensor:
        """The mean embedding of a fixed sample of the training images at ``params`` (cached for the last θ)."""
        digest = hashlib.blake2b(digest_size=16)
        for k in sorted(k for k in params if k.startswith("features.")):
            digest.update(k.encode())
            digest.update(params[k].detach().float().cpu().contiguous().numpy().tobytes())
        key = digest.digest()
        if self._mean is None or self._mean[0] != key:
            if self.training_images is None:
                raise ValueError("center=True needs the training images (Parts.training_images); set center: false")
            source = self.training_images()
            ids = EpisodeIds(0, 0, tuple(range(self.center_batches)), Purpose.EVAL)
            device = next(iter(params.values())).device
            with torch.no_grad():
                total, count = 0.0, 0
                for i in ids.indices:  # one batch at a time: batch norm sees batches of the training size
                    x = source.sample(EpisodeIds(0, 0, (i,), Purpose.EVAL)).support_x[0].to(device)
                    z = embed(self.model, params, x).float()
                    total, count = total + z.sum(0), count + len(z)
            self._mean = (key, total / count)
        return self._mean[1]

    def transform(self, z: torch.Tensor, center: torch.Tensor | None) -> torch.Tensor:
        """The embedding as the solvers see it: centred and/or L2-normalized, per ``center`` and ``normalize``."""
        if center is not None:
            z = z - center.to(z.dtype)
        if self.normalize:
            z = z / z.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return z

    def start(self, params: Params, support_x: torch.Tensor, support_y: torch.Tensor) -> Params:
        if self.center and CENTER not in params:
            params = self.prepare(params)
        z = self.transform(embed(self.model, params, support_x), params.get(CENTER))
        weight, bias = self._head(z, support_y)
        task = {k: v for k, v in params.items() if k.startswith("features.")}
        task.update({"head.weight": weight, "head.bias": bias})
        if CENTER in params:
            task[CENTER] = params[CENTER]
        return task

    def _head(self, z: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.solver == "logistic":
            w, b = logistic_fit(z, y, self.n_way, self.logistic_c)
            return w.to(z.dtype), b.to(z.dtype)
        if self.solver == "centroid":
            onehot = (y[:, None] == torch.arange(self.n_way, device=y.device)).to(z.dtype)
            protos = onehot.T @ z / onehot.sum(0).clamp_min(1)[:, None]
            return 2 * self.logit_scale * protos, -self.logit_scale * (protos**2).sum(1)
        if self.solver == "ridge":
            alpha = ridge_dual(z[None], y[None], self.n_way, self.ridge_lambda)[0]
        else:
            alpha = svm_dual(z[None], y[None], self.n_way, self.svm_c, max_iter=self.svm_iters).x[0]
        weight = self.logit_scale * alpha.T @ z
        return weight, torch.zeros(self.n_way, dtype=z.dtype, device=z.device)

    def adapt(self, params: Params, support_x: torch.Tensor, support_y: torch.Tensor) -> Params:
        return self.start(params, support_x, support_y)

    def tunable(self, task_params: Params) -> tuple[str, ...]:
        if self.fine_tune == "all":
            return tuple(k for k in task_params if k != CENTER)
        return self.model.head_keys

    def predict(self, task_params: Params, x: torch.Tensor) -> torch.Tensor:
        z = self.transform(embed(self.model, task_params, x), task_params.get(CENTER))
        return z @ task_params["head.weight"].T + task_params["head.bias"]



@register
class PretrainConfig(AlgorithmConfig):
    """Pre-training on the training classes' global labels, then a task solver on the frozen embedding."""

    name: Literal["pretrain"] = "pretrain"
    images_per_task: PositiveInt = 16
    """Images per training task: one batch, normalized by batch norm on its own; a step's minibatch is
    outer.meta_batch_size of them (e.g. 4 x 16 = 64)."""
    solver: Literal["centroid", "logistic", "ridge", "svm"] = "centroid"
    """The test-time head written from each support set: nearest centroid (SimpleShot), logistic regression
    (RFS), MetaOptNet's ridge or SVM head."""
    center: bool = True
    """Subtract the mean embedding of the training images (SimpleShot's centring) before solving."""
    normalize: bool = True
    """L2-normalize the embeddings before solving (SimpleShot, RFS)."""
    logit_scale: PositiveFloat = 10.0
    """Multiplies the centroid, ridge and SVM heads' logits: changes the query loss and test-time fine-tuning,
    never the accuracy."""
    logistic_c: PositiveFloat = 1.0
    """C of the logistic regression (scikit-learn's convention; RFS: 1)."""
    ridge_lambda: PositiveFloat = 1.0
    """The ridge head's penalty."""
    svm_c: PositiveFloat = 0.1
    """The SVM head's C."""
    fine_tune: Literal["head", "all"] = "head"
    """What test-time SGD steps (eval.steps > 0) tune: the written head, or the head and the embedding."""
    center_batches: PositiveInt = Field(64, le=10_000)
    """Training batches (of images_per_task images) whose mean embedding centres the features."""
    families = ("images",)
    test_keys = ("solver", "center", "normalize", "logit_scale", "logistic_c", "ridge_lambda", "svm_c", "fine_tune",
                 "center_batches")

    def minibatch(self) -> int:
        return self.images_per_task

    def build(self, parts: Parts) -> Pretrain:
        # L-BFGS (logistic) and the active-set QP (svm) branch on their data: episodes are solved one at a time.
        strategy = "loop" if self.solver in ("logistic", "svm") else parts.strategy
        return Pretrain(parts.model, parts.objective, parts.n_way, parts.train_classes, solver=self.solver,
                        center=self.center, normalize=self.normalize, logit_scale=self.logit_scale,
                        logistic_c=self.logistic_c, ridge_lambda=self.ridge_lambda, svm_c=self.svm_c,
                        fine_tune=self.fine_tune, center_batches=self.center_batches,
                        training_images=parts.training_images, strategy=strategy)
