"""The run: config, central learner, worker actors, checkpoints, tracking and the CLI.

The public API, imported on first use (so that ``import orchestrator.config`` stays light)::

    from orchestrator import evaluate_checkpoint, load_config, train
    from orchestrator.sweep.tuner import sweep
    result = train(load_config("configs/sine-maml.yaml", ["outer.steps=100"]))

Subpackages, each one concept, with arrows running one way (``cli`` -> ``sweep`` -> ``run`` -> ``workers`` ->
``build`` -> ``config``; ``run`` and ``sweep`` -> ``tracking`` -> ``config``): ``config`` (the typed config
tree), ``workers`` (who computes a meta-step), ``run`` (one run end to end), ``tracking`` (MLflow),
``sweep`` (Ray Tune), ``cli`` (the command line).
"""

from __future__ import annotations

import importlib
from typing import Any

from orchestrator.version import version

_PUBLIC = {
    "load_config": "orchestrator.config",
    "parse_config": "orchestrator.config",
    "Config": "orchestrator.config",
    "train": "orchestrator.run.launch",
    "evaluate_checkpoint": "orchestrator.run.recipe",
    "TrainResult": "orchestrator.run.recipe",
}
__all__ = [*_PUBLIC, "version"]


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'orchestrator' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
