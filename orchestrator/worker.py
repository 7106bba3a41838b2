"""TaskWorker: samples its share of episodes locally and returns their summed meta-gradient.

The same class runs as a Ray actor (``WorkerGroup``) and in-process
(``LocalGroup``), so both modes run one code path. A worker is built from the
run config alone; an actor restart re-runs the constructor and the worker
rebuilds itself, which is enough because episodes are seed-addressed and θ
arrives with every call.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from learners.inner_loop import adaptation_curves
from learners.params import ParamSpec
from orchestrator.build import build_algorithm, build_tasks
from orchestrator.config import Config, parse_config
from orchestrator.messages import TaskResult
from tasks.episode import EpisodeIds, TaskSource


class TaskWorker:
    def __init__(self, config: dict[str, Any], index: int, restarted: bool = False, store_path: str | None = None):
        self.cfg: Config = parse_config(config)
        if store_path is not None:  # this node reads the image store from a local copy
            self.cfg = self.cfg.model_copy(update={"task": self.cfg.task.model_copy(update={"store": store_path})})
        self.index = index
        self.incarnation = uuid.uuid4().hex
        self.device = _device(self.cfg)
        self.algorithm = build_algorithm(self.cfg)
        self.spec = ParamSpec.of(self.algorithm.init_params(0))
        self._sources: dict[tuple[str, str | None], TaskSource] = {}
        self._restarted = restarted

    def ready(self) -> str:
        return self.incarnation

    def meta_gradient(self, theta: np.ndarray, ids: EpisodeIds) -> TaskResult:
        """Summed meta-gradient and statistics of the episodes ``ids`` at the flat parameters ``theta``."""
        self._maybe_fail(ids)
        start = time.perf_counter()
        params = self._params(theta)
        summed = self.algorithm.meta_gradient(params, self._source("train").sample(ids).to(self.device))
        grad = self.spec.flatten(summed.grads).detach().cpu().numpy().astype(np.float32, copy=False)
        return TaskResult(grad, summed.stats, summed.tasks, summed.dropped, time.perf_counter() - start,
                          self.index, self.incarnation)

    def meta_gradient_parts(self, theta: np.ndarray, ids: EpisodeIds) -> tuple[TaskResult, np.ndarray]:
        """``meta_gradient`` as (header, gradient), so the gradient can stay on this node for a reducer."""
        result = self.meta_gradient(theta, ids)
        return replace(result, grad=np.empty(0, dtype=np.float32)), result.grad

    def evaluate(self, theta: np.ndarray, ids: EpisodeIds, steps: int, lr: float, probe: str | None = None) -> dict[str, np.ndarray]:
        """Per-episode query loss (and metrics) after 0..``steps`` adaptation steps: ``[len(ids), steps + 1]``."""
        batch = self._source("eval", probe).sample(ids).to(self.device)
        out = adaptation_curves(self.algorithm, self._params(theta), batch, steps, lr)
        return {k: v.detach().cpu().numpy() for k, v in out.items()}

    def _params(self, theta: np.ndarray) -> dict[str, torch.Tensor]:
        # Arrays from Ray's object store are read-only views; torch needs its own writable copy.
        return self.spec.unflatten(torch.tensor(theta, dtype=torch.float32, device=self.device))

    def _source(self, split: str, probe: str | None = None) -> TaskSource:
        key = (split, probe)
        if key not in self._sources:
            task = self.cfg.task if probe is None else self.cfg.probe_task(probe)
            self._sources[key] = build_tasks(task, split)
        return self._sources[key]

    def _maybe_fail(self, ids: EpisodeIds) -> None:
        fault = self.cfg.workers.fault_injection
        if fault is None or self._restarted or fault.worker != self.index or fault.step != ids.step:
            return
        if fault.action == "exit":
            os._exit(1)  # the process dies mid-step, as a crashed or OOM-killed worker would
        time.sleep(fault.seconds)  # a straggler: slow, but its result is still correct


def _device(cfg: Config) -> torch.device:
    """Where this worker computes; a fractional GPU share also caps this process's GPU memory."""
    w = cfg.workers
    if w.device == "cpu" or (w.device == "auto" and (w.num_gpus == 0 or not torch.cuda.is_available())):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("workers.device is cuda but this worker sees no GPU; set workers.num_gpus > 0")
    if 0 < w.num_gpus < 1:
        # Fractional GPUs in Ray are only a scheduling promise: enforce the share of memory ourselves.
        torch.cuda.set_per_process_memory_fraction(w.num_gpus)
    return torch.device("cuda")
