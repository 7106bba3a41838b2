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

from learners.models.classifier import Classifier
from learners.models.norm import BatchNorm2d


def conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        # No conv bias: batch norm's shift makes it redundant, and its gradient is pure rounding noise, which
        # Adam would turn into full-size steps.
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        BatchNorm2d(out_channels, track_running_stats=False),
        nn.ReLU(),
        nn.MaxPool2d(2),
    )


def feature_size(image_size: int, blocks: int = 4) -> int:
    for _ in range(blocks):
        image_size //= 2
    return image_size


class Conv4(Classifier):
    """Conv-4 embedding (``features``) plus a linear ``head`` over ``n_way`` classes."""

    def __init__(self, in_channels: int, image_size: int, n_way: int, width: int = 64):
        side = feature_size(image_size)
        if side < 1:
            raise ValueError(f"images of {image_size}x{image_size} are too small for Conv-4 (needs >= 16)")
        features = nn.Sequential(
            conv_block(in_channels, width), conv_block(width, width), conv_block(width, width),
            conv_block(width, width), nn.Flatten(),
        )
        super().__init__(features, width * side * side, n_way)
