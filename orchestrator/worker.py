"""TaskWorker: samples its share of episodes locally and returns their summed meta-gradient.

The same class runs as a Ray actor (``actor_pool.RemoteWorker``) and in-process
(``group.LocalGroup``), so both modes run one code path. A worker is built from
the run config alone; an actor restart re-runs the constructor and the worker
rebuilds itself, which is enough because episodes are seed-addressed and θ
arrives with every call.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
import torch

from learners.inner_loop import adaptation_curves
from learners.params import ParamSpec
from learners.registry import import_plugins
from orchestrator.build import build_algorithm, build_tasks
from orchestrator.config import Config, ConfigError, parse_config
from orchestrator.messages import EvalResult, TaskResult
from tasks.episode import EpisodeIds, TaskSource

DRILL_ENV = "METARAY_FAULT_DRILL"


@dataclass(frozen=True)
class FaultDrill:
    """Make one worker fail on purpose, for tests and fire drills: at meta-step ``step`` the worker with index
    ``worker`` exits (as a crashed or OOM-killed process would) or sleeps ``seconds`` (a straggler).

    Set through the environment of the command, never the run config::

        METARAY_FAULT_DRILL='{"worker": 1, "step": 2, "action": "exit"}' metaray train ...
    """

    worker: int
    step: int
    action: Literal["exit", "sleep"] = "exit"
    seconds: float = 30.0

    @staticmethod
    def from_env() -> FaultDrill | None:
        raw = os.environ.get(DRILL_ENV)
        if not raw:
            return None
        try:
            drill = FaultDrill(**json.loads(raw))
            if drill.action not in ("exit", "sleep") or min(drill.worker, drill.step) < 0:
                raise ValueError(drill)
            return drill
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{DRILL_ENV}={raw!r}: expected JSON such as "
                              '{"worker": 1, "step": 2, "action": "exit"} (action exit or sleep, with "seconds")'
                              ) from e


class TaskWorker:
    def __init__(self, config: dict[str, Any], index: int, restarted: bool = False, store_path: str | None = None,
                 plugins: list[tuple[str, str]] = (), drill: FaultDrill | None = None):
        import_plugins(list(plugins))  # algorithms registered outside `learners` (the config names them)
        self.cfg: Config = parse_config(config)
        if store_path is not None:  # this node reads the image store from a local copy
            self.cfg = self.cfg.model_copy(update={"task": self.cfg.task.model_copy(update={"store": store_path})})
        self.index = index
        self.incarnation = uuid.uuid4().hex
        self.device = _device(self.cfg)
        self.algorithm = build_algorithm(self.cfg)
        # Training episodes may have another n_way (task.train.n_way); a head written from the support set follows.
        self.train_algorithm = build_algorithm(self.cfg, "train")
        self.spec = ParamSpec.of(self.algorithm.init_params(0))
        self._sources: dict[tuple[str, str | None], TaskSource] = {}
        # A restarted actor re-runs this constructor; a drill fires only in the first incarnation.
        self._drill = None if restarted or drill is None or drill.worker != index else drill

    def ready(self) -> str:
        return self.incarnation

    def meta_gradient(self, theta: np.ndarray, ids: EpisodeIds) -> TaskResult:
        """Summed meta-gradient and statistics of the episodes ``ids`` at the flat parameters ``theta``."""
        if self._drill is not None and self._drill.step == ids.step:
            if self._drill.action == "exit":
                os._exit(1)  # the process dies mid-step
            time.sleep(self._drill.seconds)  # a straggler: slow, but its result is still correct
        start = time.perf_counter()
        params = self._params(theta)
        summed = self.train_algorithm.meta_gradient(params, self._source("train").sample(ids).to(self.device))
        grad = self.spec.flatten(summed.grads).detach().cpu().numpy().astype(np.float32, copy=False)
        return TaskResult(grad, summed.stats, summed.tasks, summed.dropped, time.perf_counter() - start,
                          self.index, self.incarnation)

    def meta_gradient_parts(self, theta: np.ndarray, ids: EpisodeIds) -> tuple[TaskResult, np.ndarray]:
        """``meta_gradient`` as (header without gradient, gradient), so the gradient can stay on this node."""
        result = self.meta_gradient(theta, ids)
        return replace(result, grad=np.empty(0, dtype=np.float32)), result.grad

    def evaluate(self, theta: np.ndarray, ids: EpisodeIds, steps: int, lr: float, probe: str | None = None,
                 split: str = "eval") -> EvalResult:
        """Per-episode query loss (and metrics) after 0..``steps`` adaptation steps: ``[len(ids), steps + 1]``,
        on episodes of ``split`` ("eval": the final evaluation's classes; "val": validation's)."""
        batch = self._source(split, probe).sample(ids).to(self.device)
        out = adaptation_curves(self.algorithm, self._params(theta), batch, steps, lr)
        return EvalResult({k: v.detach().cpu().numpy() for k, v in out.items()}, self.incarnation)

    def _params(self, theta: np.ndarray) -> dict[str, torch.Tensor]:
        # Arrays from Ray's object store are read-only views; torch needs its own writable copy.
        return self.spec.unflatten(torch.tensor(theta, dtype=torch.float32, device=self.device))

    def _source(self, split: str, probe: str | None = None) -> TaskSource:
        key = (split, probe)
        if key not in self._sources:
            task = self.cfg.task if probe is None else self.cfg.probe_task(probe)
            self._sources[key] = build_tasks(task, split)
        return self._sources[key]


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
