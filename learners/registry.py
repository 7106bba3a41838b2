"""The algorithm registry: each algorithm's config variant, tagged by ``name``, and how to build it.

An algorithm lives in one file that declares its config next to its code and registers it::

    class ReptileConfig(AlgorithmConfig):
        name: Literal["reptile"] = "reptile"
        inner_steps: NonNegativeInt = 5

        def build(self, parts: Parts) -> Reptile:
            return Reptile(parts.model, parts.objective, self.inner_steps, self.inner_lr, strategy=parts.strategy)

    register(ReptileConfig)

The run config then accepts ``algorithm: {name: reptile, inner_steps: 5}`` and rejects keys that
``ReptileConfig`` does not declare; nothing else in metaray changes. Every module of the ``learners``
package is imported once, on first use of the registry, so built-in algorithms are found without a
list. An algorithm defined elsewhere (a user's module, a test) registers when its module is imported;
Ray workers import that module too (``plugin_modules`` / ``import_plugins``).
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, PositiveFloat, PositiveInt
from torch import nn

from learners.objective import Objective
from learners.strategy import Strategy


class AlgorithmConfig(BaseModel):
    """What every algorithm variant has; a variant adds its own knobs and ``build``."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    name: str
    """The algorithm (a registered name, e.g. maml, protonet)."""
    strategy: Literal["auto", "vmap", "loop", "onepass"] = "auto"
    """Per-task execution; auto picks the measured faster one for the backbone and device. onepass (head-only
    learners): the images of all the share's tasks in one backbone pass, each task's sets normalized by their own
    statistics, then the per-task heads."""
    tasks_per_pass: PositiveInt | None = None
    """onepass: at most this many tasks per backbone pass, a share cut into chunks where its pass would not fit in
    memory (null: the whole share in one pass)."""
    inner_lr: PositiveFloat = 0.01
    """Step size of SGD on a support set: the inner loop, and fine-tuning at evaluation (eval.inner_lr)."""

    families: ClassVar[tuple[str, ...]] = ("sine", "images")
    """Task families the algorithm works on."""
    test_keys: ClassVar[tuple[str, ...]] = ()
    """Keys that change only how test tasks are solved, never θ: ``metaray eval`` takes them as overrides."""

    def build(self, parts: Parts) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must define build(parts)")

    def check(self, cfg: Any) -> list[str]:
        """Errors that need the whole run config, each as 'section.key: message' (none by default)."""
        return []

    def one_pass(self) -> bool:
        """Whether the algorithm as configured runs the ``onepass`` strategy: its backbone is the same function of
        θ for every task (a head-only learner). False by default."""
        return False

    def minibatch(self) -> int | None:
        """Images per training task for an algorithm that trains on minibatches of images with their split-global
        labels (``tasks.minibatch``: each task of a meta-step is one batch); None (the default): it trains on
        episodes. The learner then asks for batches (``Purpose.BATCH``) instead of episodes."""
        return None


@dataclass(frozen=True)
class Parts:
    """What an algorithm is built from, resolved from the run config by ``orchestrator.build``."""

    model: nn.Module  # the task model, structure only (meta device)
    objective: Objective
    in_features: int  # flat input width of the task model
    n_way: int | None  # classes per episode (image tasks), else None
    strategy: Strategy  # "vmap", "loop" or "onepass" ("auto" already resolved)
    tasks_per_pass: int | None = None  # onepass: tasks per backbone pass (None: the whole share)
    train_classes: int | None = None  # classes of the training split, times 4 with rotations (image tasks)
    training_images: Callable[[], Any] | None = None
    """Image tasks: builds the training split's minibatch source (``tasks.minibatch.ImageBatches``, no
    augmentation), for statistics of the training images at test time (pre-training's mean feature)."""


DEFAULT_ALGORITHM = "maml"  # an algorithm section without ``name``
_VARIANTS: dict[str, type[AlgorithmConfig]] = {}
_discovered = False


def register(config: type[AlgorithmConfig]) -> type[AlgorithmConfig]:
    """Make every name in ``config.name``'s Literal an algorithm of the run config (usable as a decorator)."""
    names = getattr(config.model_fields["name"].annotation, "__args__", ())
    if not names or not all(isinstance(n, str) for n in names):
        raise TypeError(f"{config.__name__}.name must be a Literal of algorithm names, e.g. Literal['maml']")
    for name in names:
        taken = _VARIANTS.get(name)
        if taken is not None and _qualname(taken) != _qualname(config):
            raise ValueError(f"algorithm {name!r} is already registered by {_qualname(taken)}")
        _VARIANTS[name] = config
    return config


def variants() -> dict[str, type[AlgorithmConfig]]:
    """Every registered algorithm name and its config variant (built-ins found on first call)."""
    global _discovered
    if not _discovered:
        _discovered = True
        import learners

        for info in pkgutil.walk_packages(learners.__path__, "learners."):
            importlib.import_module(info.name)
    return dict(sorted(_VARIANTS.items()))


def variant(name: str) -> type[AlgorithmConfig]:
    """The config variant of algorithm ``name``; a ValueError listing the known names otherwise."""
    found = variants().get(name)
    if found is None:
        known = ", ".join(repr(n) for n in variants())
        raise ValueError(f"unknown algorithm {name!r} (allowed: {known})")
    return found


def plugin_modules() -> list[tuple[str, str]]:
    """(module name, file) of each registered algorithm defined outside ``learners``: a worker imports them."""
    out = []
    for config in {id(c): c for c in variants().values()}.values():
        module = sys.modules.get(config.__module__)
        if not config.__module__.startswith("learners.") and module is not None:
            out.append((config.__module__, str(getattr(module, "__file__", ""))))
    return sorted(out)


def import_plugins(modules: list[tuple[str, str]]) -> None:
    """Import each (name, file): by name where it is importable, else from its file (its folder on sys.path)."""
    for name, file in modules:
        if name in sys.modules:
            continue
        try:
            importlib.import_module(name)
            continue
        except ImportError:
            if not file or not Path(file).is_file():
                raise
        folder = str(Path(file).parent)
        if folder not in sys.path:
            sys.path.insert(0, folder)
        spec = importlib.util.spec_from_file_location(name, file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)


def _qualname(config: type) -> str:
    return f"{config.__module__}.{config.__qualname__}"
