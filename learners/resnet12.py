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

DropBlock (Ghiasi et al. 2018) is optional and off by default (``drop_prob=0``).
When on, it acts only in training mode, blocks 1-2 drop single activations and
blocks 3-4 drop ``dropblock_size`` squares (MetaOptNet's placement), and the masks
come from a private generator seeded by ``seed`` (no global RNG); with it on, use
a loop over tasks rather than ``vmap``.

>>> with torch.device("meta"):
...     net = ResNet12(in_channels=3)
>>> net.out_features((3, 84, 84))
16000
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DropBlock(nn.Module):
    """Zero ``block_size`` x ``block_size`` squares with overall rate ``drop_prob``; rescale the rest."""

    def __init__(self, drop_prob: float, block_size: int, seed: int):
        super().__init__()
        if not 0.0 <= drop_prob < 1.0 or block_size < 1:
            raise ValueError(f"need 0 <= drop_prob < 1 and block_size >= 1, got {drop_prob}, {block_size}")
        self.drop_prob, self.block_size, self.seed = drop_prob, block_size, seed
        self._gen: torch.Generator | None = None  # created on first use (keeps the module deep-copyable)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_prob == 0.0:
            return x
        if self._gen is None:
            self._gen = torch.Generator().manual_seed(self.seed)
        B, C, H, W = x.shape
        k = min(self.block_size, H, W)
        # Seed rate so that the expected dropped fraction is drop_prob (Ghiasi et al., eq. 1).
        gamma = self.drop_prob / k**2 * (H * W) / ((H - k + 1) * (W - k + 1))
        seeds = (torch.rand(B, C, H - k + 1, W - k + 1, generator=self._gen) < gamma).to(x.dtype).to(x.device)
        # A seed at (i, j) drops the square [i, i+k) x [j, j+k): pad by k-1, then a k x k max-pool.
        blocks = F.max_pool2d(F.pad(seeds, (k - 1,) * 4), kernel_size=k, stride=1) if k > 1 else seeds
        keep = 1.0 - blocks
        return x * keep * (keep.numel() / keep.sum().clamp(min=1.0))


class ResBlock(nn.Module):
    """Three conv3x3-BN units with a 1x1 shortcut, LeakyReLU(0.1), max-pool 2, optional DropBlock."""

    def __init__(self, c_in: int, c_out: int, drop_prob: float = 0.0, block_size: int = 1, seed: int = 0):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out, track_running_stats=False)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out, track_running_stats=False)
        self.conv3 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out, track_running_stats=False)
        self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False),
                                      nn.BatchNorm2d(c_out, track_running_stats=False))
        self.drop = DropBlock(drop_prob, block_size, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.leaky_relu(self.bn1(self.conv1(x)), 0.1)
        out = F.leaky_relu(self.bn2(self.conv2(out)), 0.1)
        out = self.bn3(self.conv3(out))
        out = F.max_pool2d(F.leaky_relu(out + self.shortcut(x), 0.1), 2)
        return self.drop(out)


class ResNet12(nn.Module):
    """ResNet-12 embedding network: [B, C, H, W] -> [B, out_features((C, H, W))].

    ``channels`` defaults to MetaOptNet's (64, 160, 320, 640); smaller ones make fast tests.
    """

    def __init__(self, in_channels: int = 3, channels: tuple[int, ...] = (64, 160, 320, 640),
                 drop_prob: float = 0.0, dropblock_size: int = 5, seed: int = 0):
        super().__init__()
        if len(channels) != 4 or min(channels) < 1:
            raise ValueError(f"channels must be 4 positive widths, e.g. (64, 160, 320, 640), got {channels}")
        self.in_channels, self.channels = in_channels, tuple(channels)
        widths = (in_channels, *channels)
        self.blocks = nn.Sequential(*[
            ResBlock(widths[i], widths[i + 1], drop_prob, 1 if i < 2 else dropblock_size, seed + i) for i in range(4)
        ])

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
