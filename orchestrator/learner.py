"""The central learner: holds θ and the outer optimizer, and runs synchronous meta-steps over a worker group.

One meta-step: θ goes out once (flat float32), the step's episode ids are split
into the configured number of shares, each worker returns the summed meta-gradient
of its share, ``aggregate`` sums them in share order and divides by the number of
kept tasks, and the optimizer steps. Synchronous and exact: the result equals an
in-process computation of the same meta-batch (bit-identical for the same share
count and seed).

A step never makes θ non-finite: a step whose gradient is not finite is skipped,
and one whose update would leave θ or the optimizer's state non-finite is undone.
Both are counted (``orchestrator/skipped_steps``). Everything the learner owns is in
``state_dict()``, which the checkpoint stores.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import numpy as np
import torch

from learners.params import ParamSpec, Params
from orchestrator.config import Config, OuterConfig
from orchestrator.group import LocalGroup, WorkerGroup
from tasks.episode import EpisodeIds


def make_optimizer(outer: OuterConfig, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    if outer.optimizer == "adam":
        return torch.optim.Adam(params, lr=outer.lr, weight_decay=outer.weight_decay)
    return torch.optim.SGD(params, lr=outer.lr, momentum=outer.momentum, nesterov=outer.nesterov,
                           weight_decay=outer.weight_decay)


class CentralLearner:
    def __init__(self, cfg: Config, params: Params, group: LocalGroup | WorkerGroup):
        self.cfg = cfg
        self.group = group
        self.spec = ParamSpec.of(params)
        self.params = {k: v.detach().clone().to(torch.float32) for k, v in params.items()}
        self.optimizer = make_optimizer(cfg.outer, list(self.params.values()))
        self.step = 0
        self.skipped_steps = 0

    def state_dict(self) -> dict[str, Any]:
        """A snapshot (copies, unlike torch's optimizer.state_dict(), whose tensors later steps change in place)."""
        return {"params": {k: v.detach().clone() for k, v in self.params.items()},
                "optimizer": copy.deepcopy(self.optimizer.state_dict()), "step": self.step,
                "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            for k, v in self.params.items():
                v.copy_(state["params"][k])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.skipped_steps = int(state["step"]), int(state["skipped_steps"])

    def theta(self) -> np.ndarray:
        """θ as the flat float32 vector workers receive."""
        return self.spec.flatten(self.params).numpy().astype(np.float32, copy=True)

    def meta_step(self) -> dict[str, float]:
        """Run meta-step ``self.step`` and return its metrics (namespaced for tracking)."""
        self.group.maintain()  # step boundary: restarted, lost and newly joined workers
        start = time.perf_counter()
        ids = EpisodeIds(self.cfg.run.seed, self.step, tuple(range(self.cfg.outer.meta_batch_size)))
        agg = self.group.meta_gradient(self.theta(), ids.split(self.cfg.workers.share_count))
        opt_start = time.perf_counter()
        lr = self.cfg.outer.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # Every task diverged, or the finite per-task gradients overflowed when summed: skip the step.
        if agg.grad is None or not np.isfinite(agg.grad).all() or not self._apply(agg.grad):
            self.skipped_steps += 1
        end = time.perf_counter()
        self.step += 1

        metrics = {f"inner/{k}": v for k, v in agg.stats.items()}
        if agg.stats:
            metrics["meta/loss"] = agg.stats.get("loss_after", agg.stats.get("loss_before"))
        step_s = end - start
        timing = agg.timing
        metrics.update({
            "perf/step_s": step_s,
            "perf/tasks_per_s": self.cfg.outer.meta_batch_size / step_s,
            "perf/compute_s": agg.compute_s,
            "perf/put_s": timing.put_s,
            "perf/dispatch_get_s": max(0.0, timing.wait_s - agg.compute_s),
            "perf/optimizer_s": end - opt_start,
            "perf/gathered_mb": timing.gathered_bytes / 2**20,
            "orchestrator/faults": float(self.group.faults.count),
            "orchestrator/stragglers": float(self.group.faults.stragglers),
            "orchestrator/workers": float(self.group.size),
            "orchestrator/dropped_tasks": float(agg.dropped),
            "orchestrator/skipped_steps": float(self.skipped_steps),
            "outer/lr": lr,
        })
        return metrics

    def _apply(self, grad: np.ndarray) -> bool:
        """One optimizer step with ``grad``; undone (False) if it would leave θ or the optimizer non-finite."""
        grads = self.spec.unflatten(torch.from_numpy(grad))
        before = self._tensors()
        saved = [t.clone() for t in before]
        with torch.no_grad():
            for name, p in self.params.items():
                p.grad = grads[name].clone()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            after = self._tensors()
            if all(bool(t.isfinite().all()) for t in after if t.is_floating_point()):
                return True
            for t, old in zip(before, saved):  # e.g. an update that overflowed float32
                t.copy_(old)
            if len(after) != len(before):  # the optimizer's state was created by this very step
                self.optimizer.state.clear()
        return False

    def _tensors(self) -> list[torch.Tensor]:
        """θ and the optimizer's state tensors, in a fixed order."""
        state = [v for p in self.params.values() for v in self.optimizer.state.get(p, {}).values()
                 if isinstance(v, torch.Tensor)]
        return [*self.params.values(), *state]
