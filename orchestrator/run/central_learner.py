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

from learners.params import Params, ParamSpec
from orchestrator.build import train_purpose
from orchestrator.config import Config, OuterConfig
from orchestrator.workers.group import Group
from tasks.episode import EpisodeIds


def make_optimizer(outer: OuterConfig, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    # fused: one kernel per tensor for the whole update (CPU and CUDA); the learner's θ is one flat tensor.
    if outer.optimizer == "adam":
        return torch.optim.Adam(params, lr=outer.lr, weight_decay=outer.weight_decay, fused=True)
    return torch.optim.SGD(params, lr=outer.lr, momentum=outer.momentum, nesterov=outer.nesterov,
                           weight_decay=outer.weight_decay, fused=True)


class CentralLearner:
    def __init__(self, cfg: Config, params: Params, group: Group):
        self.cfg = cfg
        self.group = group
        self.spec = ParamSpec.of(params)
        # θ is one flat float32 tensor (what workers receive); ``params`` are named views of it. The optimizer
        # steps the flat tensor: its updates are elementwise, so this is the per-tensor update in one kernel.
        self.flat = self.spec.flatten({k: v.detach().to(torch.float32) for k, v in params.items()}).clone()
        self.params = self.spec.unflatten(self.flat)
        self.optimizer = make_optimizer(cfg.outer, [self.flat])
        self._backup: list[torch.Tensor] = []  # θ and the optimizer's state before the step being applied
        self._shares = [s.indices for s in EpisodeIds(0, 0, tuple(range(cfg.outer.meta_batch_size)))
                        .split(cfg.workers.share_count)]
        self._purpose = train_purpose(cfg)  # training episodes, or minibatches for an algorithm that asks for them
        self.step = 0
        self.skipped_steps = 0

    def state_dict(self) -> dict[str, Any]:
        """A snapshot (copies, unlike torch's optimizer.state_dict(), whose tensors later steps change in place).

        The optimizer's state is given per named parameter, in torch's layout for an optimizer over
        ``params`` (as checkpoints have always held it), not as the flat tensor it is kept in.
        """
        return {"params": {k: v.detach().clone() for k, v in self.params.items()},
                "optimizer": self._per_parameter(self.optimizer.state_dict()), "step": self.step,
                "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            for k, v in self.params.items():
                v.copy_(state["params"][k])
        self.optimizer.load_state_dict(self._flat_state(state["optimizer"]))
        self.step, self.skipped_steps = int(state["step"]), int(state["skipped_steps"])

    def _per_parameter(self, flat: dict[str, Any]) -> dict[str, Any]:
        """torch's state_dict layout for an optimizer over the named parameters, from the flat optimizer's."""
        state = flat["state"].get(0, {})
        per_param = {}
        for i, view in enumerate(self.params.values()):
            start, n = view.storage_offset(), view.numel()
            per_param[i] = {k: v[start:start + n].view(view.shape).clone() if _elementwise(v, self.flat)
                            else copy.deepcopy(v) for k, v in state.items()}
        groups = [{**g, "params": list(range(len(self.params)))} for g in flat["param_groups"]]
        return {"state": per_param if state else {}, "param_groups": copy.deepcopy(groups)}

    def _flat_state(self, per_param: dict[str, Any]) -> dict[str, Any]:
        """The inverse of ``_per_parameter``: the flat optimizer's state_dict."""
        states = [per_param["state"].get(i) for i in range(len(self.params))]
        if any(s is None for s in states) and any(s is not None for s in states):
            raise ValueError("optimizer state is missing for some parameters but not others")
        flat: dict[str, Any] = {}
        if states and states[0] is not None:
            views = list(self.params.values())
            for k, v in states[0].items():
                flat[k] = (torch.cat([s[k].reshape(-1) for s in states])
                           if all(_elementwise(s[k], p) for s, p in zip(states, views)) else v)
        own = self.optimizer.param_groups[0]
        # Hyperparameters come from the checkpoint; how the update is computed (fused) is this learner's.
        group = {**per_param["param_groups"][0], "params": [0], **{k: own[k] for k in ("fused", "foreach")}}
        return {"state": {0: flat} if flat else {}, "param_groups": [group]}

    def theta(self) -> np.ndarray:
        """θ as the flat float32 vector workers receive."""
        return self.flat.numpy().copy()

    def meta_step(self) -> dict[str, float]:
        """Run meta-step ``self.step`` and return its metrics (namespaced for tracking)."""
        self.group.maintain()  # step boundary: restarted, lost and newly joined workers
        start = time.perf_counter()
        seed = self.cfg.run.seed
        shares = [EpisodeIds(seed, self.step, indices, self._purpose) for indices in self._shares]
        agg = self.group.meta_gradient(self.theta(), shares)
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
        faults = self.group.faults
        metrics.update({
            "perf/step_s": step_s,
            "perf/tasks_per_s": self.cfg.outer.meta_batch_size / step_s,
            "perf/compute_s": agg.compute_s,
            "perf/put_s": timing.put_s,
            "perf/dispatch_get_s": max(0.0, timing.wait_s - agg.compute_s),
            "perf/optimizer_s": end - opt_start,
            "perf/gathered_mb": timing.gathered_bytes / 2**20,
            "orchestrator/faults": float(faults.count),
            "orchestrator/stragglers": float(faults.stragglers),
            "orchestrator/workers": float(self.group.size),
            "orchestrator/dropped_tasks": float(agg.dropped),
            "orchestrator/skipped_steps": float(self.skipped_steps),
            "outer/lr": lr,
        })
        if agg.peak_mb:
            metrics["perf/peak_gpu_mb"] = agg.peak_mb
        return metrics

    def _apply(self, grad: np.ndarray) -> bool:
        """One optimizer step with ``grad``; undone (False) if it would leave θ or the optimizer non-finite."""
        self.flat.grad = torch.from_numpy(grad)
        before = self._tensors()
        if [t.shape for t in self._backup] != [t.shape for t in before]:
            self._backup = [torch.empty_like(t) for t in before]
        for saved, t in zip(self._backup, before):
            saved.copy_(t)
        with torch.no_grad():
            self.optimizer.step()
        self.flat.grad = None
        after = self._tensors()
        if bool(torch.stack([t.sum() for t in after]).isfinite().all()):  # finite sums: finite terms (see strategy)
            return True
        for t, saved in zip(before, self._backup):  # e.g. an update that overflowed float32
            t.copy_(saved)
        if len(after) != len(before):  # the optimizer's state was created by this very step
            self.optimizer.state.clear()
        return False

    def _tensors(self) -> list[torch.Tensor]:
        """θ and the optimizer's state tensors, in a fixed order."""
        state = self.optimizer.state.get(self.flat, {})
        return [self.flat, *(v for v in state.values() if isinstance(v, torch.Tensor) and v.is_floating_point())]


def _elementwise(state: Any, param: torch.Tensor) -> bool:
    """Whether an optimizer state entry has one value per element of ``param`` (Adam's moments) or not (its step)."""
    return isinstance(state, torch.Tensor) and state.shape == param.shape and state.dim() > 0
