"""The task sections of the config: sine regression, and N-way K-shot image classification with its
class splits, training-episode shape and augmentation. ``TaskConfig`` is their union, told apart by ``family``.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal, Union

from pydantic import (
    Discriminator,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveInt,
    Tag,
    field_validator,
    model_validator,
)

from orchestrator.config.base import InvalidKey, Range, Strict


class SineTaskConfig(Strict):
    """Sine regression (MAML paper): y = A sin(x - phase)."""

    family: Literal["sine"] = "sine"
    k_shot: PositiveInt = 10
    """Support points per task."""
    query: PositiveInt = 10
    """Query points per task."""
    amplitude: Range = (0.1, 5.0)
    phase: Range = (0.0, math.pi)
    x_range: Range = (-5.0, 5.0)
    support_x_range: Range | None = None
    """Where support x is drawn (default: x_range); (0, 5) is the MAML paper's robustness probe."""

    @model_validator(mode="after")
    def _fits(self) -> "SineTaskConfig":
        for name in ("amplitude", "phase", "x_range", "support_x_range"):
            lo_hi = getattr(self, name)
            if lo_hi is not None and not lo_hi[0] <= lo_hi[1]:
                raise InvalidKey(name, f"must be [low, high] with low <= high, got {list(lo_hi)}")
        return self


Names = Union[list[str], float]


class SplitConfig(Strict):
    """Which classes each split may use. Splits are by class, never by image; Omniglot's are by alphabet."""

    by: Literal["group", "class"] = "group"
    """group: split whole groups (Omniglot alphabets, miniImageNet's csv splits); class: split classes."""
    train: Names = 0.7
    """Names of groups/classes, or the fraction of them (drawn with ``seed``)."""
    val: Names = 0.0
    test: Names = 0.3
    seed: NonNegativeInt = 0

    @field_validator("train", "val", "test", mode="before")
    @classmethod
    def _names_or_fraction(cls, v: Any) -> Any:
        ok_list = isinstance(v, list) and all(isinstance(x, str) for x in v)
        ok_fraction = isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1
        if not (ok_list or ok_fraction):
            raise ValueError(f"expected a list of group/class names or a fraction between 0 and 1, got {v!r}")
        return v


class TrainEpisodes(Strict):
    """Training episodes where they differ from evaluation's; evaluation uses the task's own shape.

    ProtoNet trains Omniglot 60-way for 20-way tests, MetaOptNet 15-shot for 1-shot tests. An algorithm whose
    head is in θ (MAML and kin) must train with the evaluation n_way (checked at run start); one that writes its
    head from each support set (ProtoNet, MetaOptNet) need not. Unset keys follow the task's.
    """

    n_way: PositiveInt | None = None
    k_shot: PositiveInt | None = None
    query: PositiveInt | None = None
    within_group: bool | None = None


class JitterConfig(Strict):
    """Colour jitter (torchvision's ColorJitter): each factor is drawn in [max(0, 1 - v), 1 + v]."""

    brightness: NonNegativeFloat = 0.0
    contrast: NonNegativeFloat = 0.0
    saturation: NonNegativeFloat = 0.0
    """No effect on greyscale images."""


class AffineConfig(Strict):
    """Random affine map about the image centre (Omniglot: Koch et al.'s small distortions)."""

    degrees: float = Field(0.0, ge=0.0, le=180.0)
    """Rotation drawn in [-degrees, degrees]."""
    shear: float = Field(0.0, ge=0.0, le=45.0)
    """Horizontal shear angle drawn in [-shear, shear] degrees."""
    scale: Range = (1.0, 1.0)
    """Zoom drawn in [low, high]."""
    translate: float = Field(0.0, ge=0.0, le=0.5)
    """Shift drawn in [-translate, translate] of the width (and height)."""

    @model_validator(mode="after")
    def _scale(self) -> "AffineConfig":
        if not 0 < self.scale[0] <= self.scale[1]:
            raise InvalidKey("scale", f"must be [low, high] with 0 < low <= high, got {list(self.scale)}")
        return self


class AugmentConfig(Strict):
    """Seed-addressed augmentation of training episodes (a function of the episode id, applied on the workers)."""

    crop_padding: NonNegativeInt = 0
    """Random crop of the image's size after zero padding by this many pixels (MetaOptNet: 8 at 84x84); 0: off."""
    flip: bool = False
    """Horizontal flip with probability 1/2."""
    jitter: JitterConfig | None = None
    affine: AffineConfig | None = None
    support: bool = True
    """Augment the support images."""
    query: bool = True
    """Augment the query images."""
    at_eval: bool = False
    """Also augment evaluation (and validation) episodes; training only by default."""

    @model_validator(mode="after")
    def _augments_something(self) -> "AugmentConfig":
        if not (self.support or self.query):
            raise InvalidKey(None, "support and query are both false: nothing would be augmented; remove the section")
        if not (self.crop_padding or self.flip or self.jitter or self.affine):
            raise InvalidKey(None, "no augmentation is set (crop_padding, flip, jitter, affine); remove the section")
        return self


class ImageTaskConfig(Strict):
    """N-way K-shot few-shot classification from an image store (``metaray data convert``)."""

    family: Literal["images"] = "images"
    store: str
    """Path of the Arrow image store."""
    n_way: PositiveInt = 5
    k_shot: PositiveInt = 1
    query: PositiveInt = 15
    """Query images per class."""
    rotations: bool = False
    """Omniglot augmentation: each class rotated by 0/90/180/270 degrees gives 4 classes."""
    within_group: bool = False
    """Draw all n_way classes of an episode from one group (an Omniglot alphabet: Lake et al.'s within-alphabet
    protocol), chosen among the groups with enough classes."""
    train: TrainEpisodes = TrainEpisodes()
    """Training episodes' n_way, k_shot, query, within_group where they differ from evaluation's."""
    augment: AugmentConfig | None = None
    split: SplitConfig = SplitConfig()
    eval_split: Literal["val", "test"] = "test"
    """Classes used for evaluation (never seen in training)."""


def _family(value: Any) -> Any:
    # A task section without ``family`` is a sine task, the default family.
    return value.get("family", "sine") if isinstance(value, dict) else getattr(value, "family", None)


_TASK_CONFIGS = (SineTaskConfig, ImageTaskConfig)
TASK_FAMILIES = tuple(m.model_fields["family"].default for m in _TASK_CONFIGS)
TaskConfig = Annotated[
    Union[tuple(Annotated[m, Tag(m.model_fields["family"].default)] for m in _TASK_CONFIGS)],  # noqa: UP007
    Discriminator(_family),
]
