"""MLP backbone (the MAML sine regressor is ``MLP(1, [40, 40], 1)``)."""

from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Sequential):
    """Linear-ReLU stack; the last ``nn.Linear`` is the head (what ANIL adapts)."""

    def __init__(self, in_features: int, hidden: list[int], out_features: int):
        sizes = [in_features, *hidden]
        layers: list[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(sizes[-1], out_features))
        super().__init__(*layers)

    @property
    def head_keys(self) -> tuple[str, ...]:
        last = str(len(self) - 1)
        return (f"{last}.weight", f"{last}.bias")

    def forward_tasks(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """T task models at once: every entry of ``params`` with a leading task axis [T, ...], ``x`` [T, N, in].

        The numbers of vmap over ``functional_call``, without vmap's per-operation cost (one baddbmm a layer).
        """
        for i, layer in enumerate(self):
            if isinstance(layer, nn.Linear):
                x = torch.baddbmm(params[f"{i}.bias"].unsqueeze(1), x, params[f"{i}.weight"].transpose(1, 2))
            else:
                x = layer(x)
        return x
