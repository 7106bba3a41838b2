"""Batch norm that normalizes in float32 whatever precision the layers around it run in.

Under bfloat16 autocast (``model.precision: bfloat16``) convolutions produce bfloat16 activations.
Batch statistics over them are better taken in float32 (the usual mixed-precision practice), and
vmap over tasks needs it: on PyTorch 2.13 the batched backward of a bfloat16 convolution followed
by batch norm with float32 parameters fails ("expected scalar type BFloat16 but found Float").
In float32 and float64 runs the input is used as it is.
"""

from __future__ import annotations

import torch
from torch import nn


class BatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` on its input promoted to at least float32 (same parameters and names)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.to(torch.promote_types(x.dtype, torch.float32)))
