"""TaskWorker: samples its share of episodes locally and returns their summed meta-gradient.

The same class runs as a Ray actor (``actor_pool.RemoteWorker``) and in-process
(``group.LocalGroup``), so both modes run one code path. A worker is built from
the run config alone; an actor restart re-runs the constructor and the worker
rebuilds itself, which is enough because episodes are seed-addressed and θ
arrives with every call.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from learners.inner_loop import adaptation_curves
from learners.params import ParamSpec
from learners.registry import import_plugins
from orchestrator.build import build_algorithm, build_source, cuda_options
from orchestrator.config import Config, parse_config
from orchestrator.workers.faults import FaultDrill
from orchestrator.workers.messages import EvalResult, TaskResult, theta_array
from tasks.episode import EpisodeBatch, EpisodeIds, Purpose, TaskSource


PREFETCH_MIN_S = 1e-3
"""A share drawn faster than this is not prefetched: handing it to a thread costs more than drawing it (sine:
~0.05 ms to draw, while the hand-off and the thread's hold on the GIL delayed each result by more)."""


class TaskWorker:
    """``prefetch``: after each share, draw the same share of the next step in a background thread (and move it
    to the device), while the learner steps. Episode ids are known in advance, so a prefetched batch is exactly
    the one the next call asks for, or it is not used. For actors, which sit idle between calls; an in-process
    worker shares its process with the learner and does not prefetch. Only where drawing a share takes
    ``PREFETCH_MIN_S`` or more (the last share drawn in the call itself says)."""

    def __init__(self, config: dict[str, Any], index: int, restarted: bool = False, store_path: str | None = None,
                 plugins: list[tuple[str, str]] = (), drill: FaultDrill | None = None, prefetch: bool = False):
        import_plugins(list(plugins))  # algorithms registered outside `learners` (the config names them)
        self.cfg: Config = parse_config(config)
        if store_path is not None:  # this node reads the image store from a local copy
            self.cfg = self.cfg.model_copy(update={"task": self.cfg.task.model_copy(update={"store": store_path})})
        self.index = index
        self.incarnation = uuid.uuid4().hex
        self.device = _device(self.cfg)
        self._channels_last = _speed_options(self.cfg, self.device)
        self.algorithm = build_algorithm(self.cfg, device=self.device)
        # Training episodes may have another n_way (task.train.n_way); a head written from the support set follows.
        self.train_algorithm = build_algorithm(self.cfg, "train", self.device)
        self.spec = ParamSpec.of(self.algorithm.init_params(0))
        self._sources: dict[tuple[str, str | None, bool], TaskSource] = {}
        self._prefetcher = ThreadPoolExecutor(1, thread_name_prefix="prefetch") if prefetch else None
        self._next: tuple[EpisodeIds, Future] | None = None
        self._sample_s = 0.0  # how long drawing the last share drawn in a call took
        # A restarted actor re-runs this constructor; a drill fires only in the first incarnation.
        self._drill = None if restarted or drill is None or drill.worker != index else drill

    def ready(self) -> str:
        return self.incarnation

    def meta_gradient(self, theta: np.ndarray | bytes, ids: EpisodeIds) -> TaskResult:
        """Summed meta-gradient and statistics of the episodes ``ids`` at the flat parameters ``theta``
        (an array, or its bytes: ``messages.theta_message``)."""
        if self._drill is not None and self._drill.step == ids.step:
            if self._drill.action == "exit":
                os._exit(1)  # the process dies mid-step
            time.sleep(self._drill.seconds)  # a straggler: slow, but its result is still correct
        start = time.perf_counter()
        params = self._params(theta)
        batch = self._train_batch(ids)
        algorithm = self.train_algorithm
        algorithm = algorithm.for_step(ids.step) if hasattr(algorithm, "for_step") else algorithm
        with self._precision():
            summed = algorithm.meta_gradient(params, batch)
        grad = self.spec.flatten(summed.grads).detach().to("cpu", torch.float32).numpy()
        result = TaskResult(grad, summed.stats, summed.tasks, summed.dropped, time.perf_counter() - start,
                            self.index, self.incarnation, peak_mb=self._peak_mb())
        if self._prefetcher is not None and self._sample_s >= PREFETCH_MIN_S:
            following = replace(ids, step=ids.step + 1)
            self._next = (following, self._prefetcher.submit(self._sample, "train", following))
        return result

    def meta_gradient_parts(self, theta: np.ndarray, ids: EpisodeIds) -> tuple[TaskResult, np.ndarray]:
        """``meta_gradient`` as (header without gradient, gradient), so the gradient can stay on this node."""
        result = TaskWorker.meta_gradient(self, theta, ids)  # the result itself, whatever a subclass returns
        return replace(result, grad=np.empty(0, dtype=np.float32)), result.grad

    def evaluate(self, theta: np.ndarray, ids: EpisodeIds, steps: int, lr: float, probe: str | None = None,
                 split: str = "eval") -> EvalResult:
        """Per-episode query loss (and metrics) after 0..``steps`` adaptation steps: ``[len(ids), steps + 1]``,
        on episodes of ``split`` ("eval": the final evaluation's classes; "val": validation's)."""
        batch = self._sample(split, ids, probe)
        with self._precision():
            out = adaptation_curves(self.algorithm, self._params(theta), batch, steps, lr)
        return EvalResult({k: v.detach().float().cpu().numpy() for k, v in out.items()}, self.incarnation)

    def _train_batch(self, ids: EpisodeIds) -> EpisodeBatch:
        ahead, self._next = self._next, None
        if ahead is not None and ahead[0] == ids:
            return ahead[1].result()
        start = time.perf_counter()
        batch = self._sample("train", ids)
        self._sample_s = time.perf_counter() - start
        return batch

    def _sample(self, split: str, ids: EpisodeIds, probe: str | None = None) -> EpisodeBatch:
        """The episodes ``ids`` of ``split`` (training minibatches for ``Purpose.BATCH`` ids) on this worker's
        device: one copy to it per share."""
        batch = self._source(split, ids.purpose, probe).sample(ids).to(self.device)
        return batch.channels_last() if self._channels_last else batch

    def _peak_mb(self) -> float:
        """The most GPU memory torch's allocator has held in this process (what a fractional GPU caps), in MB."""
        return torch.cuda.max_memory_reserved(self.device) / 2**20 if self.device.type == "cuda" else 0.0

    def _precision(self) -> contextlib.AbstractContextManager:
        """bfloat16 autocast around the backbone's work (model.precision); parameters, gradients and the sums
        over tasks stay float32."""
        if self.cfg.model.precision == "bfloat16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _params(self, theta: np.ndarray | bytes) -> dict[str, torch.Tensor]:
        # Arrays from Ray's object store (and bytes) are read-only; torch needs its own writable copy.
        return self.spec.unflatten(torch.tensor(theta_array(theta), dtype=torch.float32, device=self.device))

    def _source(self, split: str, purpose: Purpose = Purpose.TRAIN, probe: str | None = None) -> TaskSource:
        key = (split, probe, purpose == Purpose.BATCH)
        if key not in self._sources:
            task = self.cfg.task if probe is None else self.cfg.probe_task(probe)
            self._sources[key] = build_source(self.cfg, split, purpose, task)
        return self._sources[key]


def _device(cfg: Config) -> torch.device:
    """Where this worker computes; a fractional GPU share also caps this process's GPU memory."""
    w = cfg.workers
    kind, memory_fraction = placement(w.device, w.num_gpus, torch.cuda.is_available())
    if memory_fraction is not None:
        # Fractional GPUs in Ray are only a scheduling promise: enforce the share of memory ourselves.
        torch.cuda.set_per_process_memory_fraction(memory_fraction)
    return torch.device(kind)


def _speed_options(cfg: Config, device: torch.device) -> bool:
    """Set the CUDA speed options (``build.cuda_options``) for this process; whether images go channels-last.
    TF32 and cuDNN's benchmark mode are process-wide switches of torch: a worker process owns them."""
    if device.type != "cuda":
        return False
    options = cuda_options(cfg)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = options["tf32"]
    torch.backends.cudnn.benchmark = options["cudnn_benchmark"]
    return options["channels_last"] and cfg.model.backbone != "mlp"


def placement(device: str, num_gpus: float, cuda_available: bool) -> tuple[str, float | None]:
    """(where a worker computes, the fraction of GPU memory it may use or None) from ``workers.device``,
    ``workers.num_gpus`` and whether its process sees a GPU."""
    if device == "cpu" or (device == "auto" and (num_gpus == 0 or not cuda_available)):
        return "cpu", None
    if not cuda_available:
        raise RuntimeError("workers.device is cuda but this worker sees no GPU; set workers.num_gpus > 0")
    return "cuda", (num_gpus if 0 < num_gpus < 1 else None)
