"""Conv-4, the standard few-shot backbone (Vinyals et al. 2016; Finn et al. 2017; Snell et al. 2017).

Four blocks of [conv 3x3 (64 filters), batch norm, ReLU, max-pool 2], then a
linear head over the flattened features. Batch norm keeps no running
statistics: it always normalizes with the current batch (the task's support or
query set), as in the MAML reference code, so the network is a pure function of
(parameters, inputs) and composes with ``functional_call`` and ``vmap``.

28x28 inputs (Omniglot) give 64 features, 84x84 (miniImageNet) give 1600.
"""

from __future__ import annotations

from torch import nn


def conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1),
        nn.BatchNorm2d(out_channels, track_running_stats=False),
        nn.ReLU(),
        nn.MaxPool2d(2),
    )


def feature_size(image_size: int, blocks: int = 4) -> int:
    for _ in range(blocks):
        image_size //= 2
    return image_size


class Conv4(nn.Module):
    """Embedding (``features``) plus a linear classifier ``head`` over ``n_way`` classes."""

    def __init__(self, in_channels: int, image_size: int, n_way: int, width: int = 64):
        super().__init__()
        self.features = nn.Sequential(
            conv_block(in_channels, width), conv_block(width, width), conv_block(width, width),
            conv_block(width, width), nn.Flatten(),
        )
        side = feature_size(image_size)
        if side < 1:
            raise ValueError(f"images of {image_size}x{image_size} are too small for Conv-4 (needs >= 16)")
        self.embedding_dim = width * side * side
        self.head = nn.Linear(self.embedding_dim, n_way)

    def forward(self, x):
        return self.head(self.features(x))

    @property
    def head_keys(self) -> tuple[str, ...]:
        return ("head.weight", "head.bias")
