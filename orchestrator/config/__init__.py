"""The run configuration: one typed, frozen tree (``tree.Config``) read from YAML with ``--set`` overrides.

``base``: what every section shares (strict validation, ``ConfigError``); ``explain``: pydantic's errors as one
line; ``sections``: model, outer, workers, eval, tracking, run; ``task``: the task families; ``lr_schedule``: how
the outer learning rate changes with the step.
"""

from orchestrator.config.base import ConfigError
from orchestrator.config.sections import (
    EvalConfig,
    ModelConfig,
    OuterConfig,
    RunConfig,
    TrackingConfig,
    WorkersConfig,
)
from orchestrator.config.tree import Config, apply_overrides, load_config, parse_config, parse_yaml

__all__ = ["Config", "ConfigError", "EvalConfig", "ModelConfig", "OuterConfig", "RunConfig", "TrackingConfig",
           "WorkersConfig", "apply_overrides", "load_config", "parse_config", "parse_yaml"]
