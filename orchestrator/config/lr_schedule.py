"""Outer learning-rate schedules (``outer.schedule``): the rate of meta-step ``step`` as a pure function of it.

    constant      lr
    step          lr * gamma ** k, k = the number of milestones <= step, or lr * factors[k - 1]   (MetaOptNet)
    exponential   lr * gamma ** (step // every)                        (ProtoNet: halve every 2000 episodes)
    cosine        a linear warm-up to lr over warmup_steps, then
                  min_lr + (lr - min_lr) * (1 + cos(pi * t)) / 2, t from 0 to 1 at total_steps    (MAML++)

Being a function of the step, a schedule keeps no state of its own: a resumed run recomputes the
same rate from the checkpoint's step (the rate in use is also in the optimizer's saved state).
"""

from __future__ import annotations

import bisect
import math
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, NonNegativeInt, PositiveInt, model_validator


class _Schedule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    def rate(self, lr: float, step: int, total_steps: int) -> float:
        """The learning rate of meta-step ``step`` (0-based) of a run of ``total_steps`` steps."""
        raise NotImplementedError


class ConstantSchedule(_Schedule):
    kind: Literal["constant"] = "constant"

    def rate(self, lr: float, step: int, total_steps: int) -> float:
        return lr


class StepSchedule(_Schedule):
    kind: Literal["step"]
    milestones: list[NonNegativeInt] = Field(min_length=1)
    """Meta-steps at which the rate changes, increasing."""
    gamma: float = Field(0.1, gt=0, le=1)
    """Multiply the rate by gamma at each milestone."""
    factors: list[Annotated[float, Field(gt=0)]] | None = None
    """Instead of gamma: the rate is lr * factors[i] from milestone i on (MetaOptNet: 0.06, 0.012, 0.0024)."""

    @model_validator(mode="after")
    def _consistent(self) -> "StepSchedule":
        if list(self.milestones) != sorted(set(self.milestones)):
            raise ValueError(f"milestones must increase, got {self.milestones}")
        if self.factors is not None and len(self.factors) != len(self.milestones):
            raise ValueError(f"factors needs one value per milestone ({len(self.milestones)}), "
                             f"got {len(self.factors)}")
        return self

    def rate(self, lr: float, step: int, total_steps: int) -> float:
        passed = bisect.bisect_right(self.milestones, step)
        if self.factors is not None:
            return lr * (self.factors[passed - 1] if passed else 1.0)
        return lr * self.gamma ** passed


class ExponentialSchedule(_Schedule):
    kind: Literal["exponential"]
    every: PositiveInt
    """Multiply the rate by gamma every this many meta-steps."""
    gamma: float = Field(0.5, gt=0, le=1)

    def rate(self, lr: float, step: int, total_steps: int) -> float:
        return lr * self.gamma ** (step // self.every)


class CosineSchedule(_Schedule):
    kind: Literal["cosine"]
    warmup_steps: NonNegativeInt = 0
    min_lr: NonNegativeFloat = 0.0
    total_steps: PositiveInt | None = None
    """Where the cosine reaches min_lr (default outer.steps; fixed once a run has started)."""

    def rate(self, lr: float, step: int, total_steps: int) -> float:
        if step < self.warmup_steps:
            return lr * (step + 1) / self.warmup_steps
        total = self.total_steps or total_steps
        t = min(1.0, (step - self.warmup_steps) / max(1, total - self.warmup_steps))
        return self.min_lr + (lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


Schedule = Annotated[Union[ConstantSchedule, StepSchedule, ExponentialSchedule, CosineSchedule],
                     Field(discriminator="kind")]
SCHEDULE_KINDS = ("constant", "step", "exponential", "cosine")
