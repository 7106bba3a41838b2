"""ResNet-12, the backbone of MetaOptNet (Lee et al. 2019) and most few-shot work since TADAM.

Four residual blocks of 64-160-320-640 channels. Each block: three 3x3 convolutions
(no bias) with batch norm, LeakyReLU(0.1) after the first two, the third's output
added to a 1x1-conv + batch-norm shortcut, then LeakyReLU(0.1) and a 2x2 max-pool
(as in MetaOptNet's ``BasicBlock``). The output is flattened, not average-pooled:
84x84x3 miniImageNet images give 640 x 5 x 5 = 16000 features, 28x28x1 Omniglot
images 640 x 1 x 1 = 640.

Batch norm keeps no running statistics (``track_running_stats=False``): it always
normalizes with the statistics of the batch it is given, so the module is a pure
function of (parameters, input) that ``torch.func.functional_call`` and ``vmap``
over a task axis can use, and each task's support and query sets are normalized
by themselves. Parameters come from ``learners.params.init_params``.

MetaOptNet also uses DropBlock; it is left out here: its masks would come from a
process-local generator rather than from the episode id, and distributed steps would
no longer be exact.

>>> with torch.device("meta"):
...     net = ResNet12(in_channels=3)
>>> net.out_features((3, 84, 84))
16000
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from learners.models.norm import BatchNorm2d


class ResBlock(nn.Module):
    """Three conv3x3-BN units with a 1x1 shortcut, LeakyReLU(0.1), max-pool 2."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.bn1 = BatchNorm2d(c_out, track_running_stats=False)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = BatchNorm2d(c_out, track_running_stats=False)
        self.conv3 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn3 = BatchNorm2d(c_out, track_running_stats=False)
        self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False),
                                      BatchNorm2d(c_out, track_running_stats=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.leaky_relu(self.bn1(self.conv1(x)), 0.1)
        out = F.leaky_relu(self.bn2(self.conv2(out)), 0.1)
        out = self.bn3(self.conv3(out))
        return F.max_pool2d(F.leaky_relu(out + self.shortcut(x), 0.1), 2)


class ResNet12(nn.Module):
    """ResNet-12 embedding network: [B, C, H, W] -> [B, out_features((C, H, W))].

    ``channels`` defaults to MetaOptNet's (64, 160, 320, 640); smaller ones make fast tests.
    """

    def __init__(self, in_channels: int = 3, channels: tuple[int, ...] = (64, 160, 320, 640)):
        super().__init__()
        if len(channels) != 4 or min(channels) < 1:
            raise ValueError(f"channels must be 4 positive widths, e.g. (64, 160, 320, 640), got {channels}")
        self.in_channels, self.channels = in_channels, tuple(channels)
        widths = (in_channels, *channels)
        self.blocks = nn.Sequential(*[ResBlock(widths[i], widths[i + 1]) for i in range(4)])

    def out_features(self, in_shape: tuple[int, int, int]) -> int:
        """Length of the flat embedding for one input of shape (C, H, W)."""
        c, h, w = in_shape
        if c != self.in_channels:
            raise ValueError(f"this ResNet12 takes {self.in_channels} input channels, got shape {tuple(in_shape)}")
        for _ in range(4):
            h, w = h // 2, w // 2
        if h < 1 or w < 1:
            raise ValueError(f"input {tuple(in_shape)} is too small for 4 max-pools; use at least 16 x 16")
        return self.channels[-1] * h * w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected [B, {self.in_channels}, H, W] images, got {tuple(x.shape)}")
        return self.blocks(x).flatten(1)
