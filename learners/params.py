"""Parameter dicts: deterministic initialization and flat views.

Parameters are plain ``dict[str, Tensor]`` applied through
``torch.func.functional_call``; nothing here mutates a module. ``flatten`` and
``unflatten`` give the one-vector view the orchestrator ships between
processes (``ParamSpec`` remembers names, shapes and order).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

Params = dict[str, torch.Tensor]


def init_params(module: nn.Module, seed: int, dtype: torch.dtype = torch.float32) -> Params:
    """Fresh parameters for ``module`` from a private generator (PyTorch's default init scheme).

    Linear and conv weights and biases ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)); norm scales 1, shifts 0.
    The module's own tensors are ignored (it may live on the meta device).
    """
    gen = torch.Generator().manual_seed(seed)
    out: Params = {}
    for prefix, sub in module.named_modules():
        for name, p in sub.named_parameters(recurse=False):
            key = f"{prefix}.{name}" if prefix else name
            if isinstance(sub, (nn.Linear, nn.Conv2d)):
                w = sub.weight
                bound = 1.0 / math.sqrt(max(1, w.shape[1] * math.prod(w.shape[2:])))
                out[key] = (torch.rand(p.shape, generator=gen, dtype=torch.float64) * 2 - 1).mul(bound).to(dtype)
            elif name == "weight":
                out[key] = torch.ones(p.shape, dtype=dtype)
            else:
                out[key] = torch.zeros(p.shape, dtype=dtype)
    return out


def materialize(module: nn.Module, params: Params) -> nn.Module:
    """A real (CPU) copy of ``module`` holding ``params`` (e.g. to run it as a plain module)."""
    real = copy.deepcopy(module).to_empty(device="cpu")
    real.load_state_dict({k: v.detach().cpu() for k, v in params.items()}, strict=True)
    return real.eval()


@dataclass(frozen=True)
class ParamSpec:
    """Names and shapes of a parameter dict, in a fixed order, for flat transport."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @staticmethod
    def of(params: Params) -> "ParamSpec":
        return ParamSpec(tuple(params), tuple(tuple(v.shape) for v in params.values()))

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    def flatten(self, params: Params) -> torch.Tensor:
        if tuple(params) != self.names:
            raise KeyError(f"parameter names differ from the spec: {sorted(set(params) ^ set(self.names))}")
        return torch.cat([params[n].reshape(-1) for n in self.names])

    def unflatten(self, flat: torch.Tensor) -> Params:
        if flat.numel() != self.numel:
            raise ValueError(f"flat vector has {flat.numel()} values, the spec needs {self.numel}")
        out: Params = {}
        offset = 0
        for name, shape in zip(self.names, self.shapes):
            n = math.prod(shape)
            out[name] = flat[offset : offset + n].view(shape)
            offset += n
        return out
