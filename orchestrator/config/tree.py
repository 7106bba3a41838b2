"""The run configuration: one typed, frozen tree read from YAML, with ``--set key.sub=value`` overrides.

Unknown keys and bad values are rejected, and every error is reported at once
on one line that names each key (``ConfigError``). Example::

    cfg = load_config("configs/sine-maml.yaml", ["outer.steps=1000", "workers.num_workers=2"])
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, SerializeAsAny, ValidationError, field_validator, model_validator

from learners.models.build import BACKBONE_KEYS
from learners.registry import DEFAULT_ALGORITHM, AlgorithmConfig, variant, variants
from orchestrator.config.base import ConfigError, InvalidKey, Strict
from orchestrator.config.explain import explain
from orchestrator.config.sections import (
    OPTIMIZER_KEYS,
    EvalConfig,
    ModelConfig,
    OuterConfig,
    RunConfig,
    TrackingConfig,
    WorkersConfig,
)
from orchestrator.config.task import ImageTaskConfig, SineTaskConfig, TaskConfig
from orchestrator.errors import one_line


def _default_algorithm() -> AlgorithmConfig:
    return variant(DEFAULT_ALGORITHM)()


class Config(Strict):
    run: RunConfig = RunConfig()
    task: TaskConfig = SineTaskConfig()
    model: ModelConfig = ModelConfig()
    algorithm: SerializeAsAny[AlgorithmConfig] = Field(default_factory=_default_algorithm)
    """One variant per algorithm (``learners.registry``), chosen by ``name``; each takes only its own keys."""
    outer: OuterConfig = OuterConfig()
    workers: WorkersConfig = WorkersConfig()
    eval: EvalConfig = EvalConfig()
    tracking: TrackingConfig = TrackingConfig()

    @field_validator("algorithm", mode="before")
    @classmethod
    def _algorithm_variant(cls, value: Any) -> Any:
        if isinstance(value, dict):  # a section without ``name`` is MAML, the default algorithm
            name = value.get("name", DEFAULT_ALGORITHM)
            if not isinstance(name, str):
                raise InvalidKey("name", f"must be an algorithm name (one of {', '.join(variants())}), got {name!r}")
            try:
                model = variant(name)
            except ValueError as e:
                raise InvalidKey("name", str(e)) from None
            return model.model_validate(value)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "Config":
        errors: list[str] = []
        w = self.workers
        if w.max_workers is not None and w.max_workers < w.num_workers:
            errors.append(f"workers.max_workers: {w.max_workers} is below workers.num_workers={w.num_workers}; "
                          "raise it (it is the elastic upper bound) or leave it out")
        if self.workers.learner == "actor" and self.workers.mode != "ray":
            errors.append("workers.learner: a learner actor needs Ray workers; set workers.mode: ray")
        image_task = isinstance(self.task, ImageTaskConfig)
        if image_task != (self.model.backbone != "mlp"):
            errors.append(f"model.backbone: {self.model.backbone!r} does not fit task family {self.task.family!r} "
                          f"(use {'conv4' if image_task else 'mlp'})")
        a = self.algorithm
        if self.task.family not in a.families:
            errors.append(f"algorithm.name: {a.name} works on task.family {' or '.join(a.families)}, not "
                          f"{self.task.family!r}")
        if a.strategy == "onepass" and not a.one_pass():
            errors.append(f"algorithm.strategy: onepass runs one backbone pass for all tasks, which needs a backbone "
                          f"that is the same for every task (a head-only learner); {a.name} as configured is not "
                          "one: use auto, vmap or loop")
        if a.tasks_per_pass is not None and not (a.strategy in ("onepass", "auto") and a.one_pass()):
            errors.append("algorithm.tasks_per_pass: only the onepass strategy cuts a share into passes; set "
                          "algorithm.strategy: onepass (or auto), or leave tasks_per_pass out")
        errors += a.check(self)
        for name in self.eval.probes:
            try:
                self.probe_task(name)
            except ValidationError as e:
                errors.append(explain(e, prefix=("eval", "probes", name), model=type(self.task)))
        if errors:
            raise InvalidKey(None, "; ".join(errors))
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir) / self.run.name

    def probe_task(self, name: str) -> TaskConfig:
        return type(self.task).model_validate({**self.task.model_dump(), **self.eval.probes[name]})

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def flat(self) -> dict[str, Any]:
        """The resolved config as ``{"outer.lr": 0.001, ...}`` (MLflow params): only the keys this run has."""
        out: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict) and value:
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else str(k), v)
            else:
                out[prefix] = value

        walk("", self.model_dump(mode="json"))
        return out

    def params(self) -> dict[str, Any]:
        """The keys runs are compared by (MLflow params): ``flat()`` without what does not apply to this run or
        does not change its results, with effective values, floats to 6 significant digits (the exact values
        are in config.yaml).

        Left out: ``workers.*``, ``tracking.*``, the run's folder, name and periods, ``eval.batch_tasks``,
        ``algorithm.strategy`` (how, not what), the model keys of other backbones (``model.width`` is Conv-4's),
        the optimizer keys of the other optimizer (``outer.momentum`` is SGD's), validation keys without
        validation, and unset keys; ``eval.inner_lr`` is the step size evaluation uses.
        """
        own = set(BACKBONE_KEYS[self.model.backbone]) | set(OPTIMIZER_KEYS[self.outer.optimizer])
        foreign = {k for keys in (*BACKBONE_KEYS.values(), *OPTIMIZER_KEYS.values()) for k in keys} - own
        out: dict[str, Any] = {}
        for key, value in {**self.flat(), "eval.inner_lr": self.eval.inner_lr or self.algorithm.inner_lr}.items():
            section, _, name = key.partition(".")
            if (section in PLUMBING_SECTIONS or key in PLUMBING_KEYS or value is None
                    or (section in ("model", "outer") and name in foreign)
                    or (key in VALIDATION_KEYS and not self.eval.every)):
                continue
            out[key] = _rounded(value)
        return out


PLUMBING_SECTIONS = ("workers", "tracking")
PLUMBING_KEYS = ("run.name", "run.dir", "run.checkpoint_every", "run.log_every", "eval.batch_tasks",
                 "algorithm.strategy", "algorithm.tasks_per_pass", "model.channels_last", "model.cudnn_benchmark")
VALIDATION_KEYS = ("eval.val_tasks", "eval.select", "eval.patience")


def _rounded(value: Any) -> Any:
    """Floats (also in lists) to 6 significant digits: 0.1 + 0.2 is shown as 0.3."""
    if isinstance(value, float):
        return float(f"{value:.6g}")
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-3`` (no dot) as a string; every config writes learning rates that way."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    """A YAML document or value as metaray reads it (``1e-3`` is a number)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def parse_config(data: Any, source: str = "config") -> Config:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections (run, task, model, ...), got {type(data).__name__}")
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{source}: {explain(e, (), Config, data)}") from None


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML config (or the defaults when ``path`` is None) and apply ``key.sub=value`` overrides."""
    data: Any = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            data = parse_yaml(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except IsADirectoryError:
            raise ConfigError(f"{path}: is a folder, not a config file; give a YAML file such as "
                              "configs/sine-maml.yaml") from None
        except (UnicodeDecodeError, PermissionError) as e:
            raise ConfigError(f"{path}: cannot read it as a YAML config ({type(e).__name__})") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({one_line(e, 400)})") from None
    data = apply_overrides(data if data is not None else {}, overrides)
    return parse_config(data, source)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """``["outer.lr=0.01", "task.support_x_range=[0, 5]"]`` -> a new nested dict; values are parsed as YAML."""
    if not isinstance(data, dict):
        return data
    out = _deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected key.sub=value, e.g. --set outer.lr=0.01")
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {p} is a value, not a section")
            node = child
        try:
            node[parts[-1]] = parse_yaml(raw)
        except yaml.YAMLError:
            node[parts[-1]] = raw
    return out


def _deepcopy(d: Any) -> Any:
    return {k: _deepcopy(v) for k, v in d.items()} if isinstance(d, dict) else d

