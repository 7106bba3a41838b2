"""What every config section shares: strict validation, and the errors it raises.

A section rejects unknown keys, coerces nothing, and refuses non-finite floats. Validators raise
``InvalidKey`` to name the key at fault; ``config_errors.explain`` turns pydantic's errors into the
one-line ``ConfigError`` users see.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field


class ConfigError(ValueError):
    """A user mistake in the configuration; the message is one line naming every bad key."""


class InvalidKey(ValueError):
    """Raised inside validators: pydantic reports it at the validator's location; ``key`` refines it."""

    def __init__(self, key: str | None, message: str):
        super().__init__(message)
        self.key = key


class Strict(BaseModel):
    # strict: a bool or a string where a number belongs is a mistake, not something to coerce;
    # allow_inf_nan=False: an infinite learning rate would train a NaN model.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


Range = Annotated[tuple[float, float], Field(strict=False)]  # YAML gives lists; strict would only take tuples
