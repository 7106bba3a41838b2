"""The task model from a plain description (backbone, widths, input shape, classes): what a run's workers build
from its config, and what a logged model rebuilds from its blueprint without the config."""

from __future__ import annotations

import torch
from torch import nn

from learners.models.classifier import Classifier
from learners.models.conv4 import Conv4
from learners.models.mlp import MLP
from learners.models.resnet12 import ResNet12
from learners.objective import MSE, CrossEntropy, Objective

BACKBONE_KEYS = {"mlp": ("hidden",), "conv4": ("width",), "resnet12": ()}
"""The model config keys each backbone reads (model.hidden is the MLP's, model.width Conv-4's)."""


def task_model(backbone: str, *, hidden: list[int], width: int, image_shape: tuple[int, int, int] | None,
               n_way: int | None) -> tuple[nn.Module, Objective, int]:
    """The task model (structure only, on the meta device), its objective and its flat input width.

    ``image_shape`` (C, H, W) and ``n_way`` for image classification; None for sine regression (the MLP).
    """
    with torch.device("meta"):
        if image_shape is None:
            return MLP(1, list(hidden), 1), MSE(), 1
        channels, height, _ = image_shape
        if backbone == "resnet12":
            net = ResNet12(channels)
            model = Classifier(net, net.out_features(tuple(image_shape)), n_way)
        else:
            model = Conv4(channels, height, n_way, width)
        return model, CrossEntropy(), channels * height * height
