"""The run configuration: one typed, frozen tree read from YAML, with ``--set key.sub=value`` overrides.

Unknown keys and bad values are rejected, and every error is reported at once
on one line that names each key (``ConfigError``). Example::

    cfg = load_config("configs/sine-maml.yaml", ["outer.steps=1000", "workers.num_workers=2"])
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    SerializeAsAny,
    ValidationError,
    field_validator,
    model_validator,
)

from learners.registry import AlgorithmConfig, variant, variants
from orchestrator.config_base import ConfigError, InvalidKey, Strict
from orchestrator.config_errors import explain
from orchestrator.errors import one_line
from orchestrator.schedule import ConstantSchedule, Schedule
from orchestrator.task_config import ImageTaskConfig, SineTaskConfig, TaskConfig

__all__ = ["Config", "ConfigError", "load_config", "parse_config", "apply_overrides", "parse_yaml"]


class ModelConfig(Strict):
    backbone: Literal["mlp", "conv4", "resnet12"] = "mlp"
    """mlp for vector tasks (sine); conv4 or resnet12 (MetaOptNet's 64-160-320-640) for images."""
    hidden: list[PositiveInt] = [40, 40]
    """Hidden layer widths of the MLP (the MAML sine regressor is [40, 40])."""
    width: PositiveInt = 64
    """Filters per Conv-4 block (64 in most papers; MAML used 32 on miniImageNet)."""
    precision: Literal["float32", "bfloat16"] = "float32"
    """bfloat16: the workers run the backbone under bfloat16 autocast (mixed precision); parameters, gradients
    and the sums over tasks stay float32."""


class OuterConfig(Strict):
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: PositiveFloat = 1e-3
    momentum: float = Field(0.0, ge=0.0, lt=1.0)
    """SGD momentum (MetaOptNet: 0.9 with Nesterov)."""
    nesterov: bool = False
    weight_decay: NonNegativeFloat = 0.0
    meta_batch_size: PositiveInt = 25
    """Tasks per meta-step."""
    steps: NonNegativeInt = 20000
    """Meta-steps in total (a resumed run continues up to this)."""
    schedule: Schedule = ConstantSchedule()
    """How lr changes with the meta-step: {kind: constant}, {kind: step, milestones: [...], gamma},
    {kind: exponential, every, gamma}, {kind: cosine, warmup_steps, min_lr, total_steps}."""

    def lr_at(self, step: int) -> float:
        """The learning rate of meta-step ``step``."""
        return self.schedule.rate(self.lr, step, self.steps)


class WorkersConfig(Strict):
    mode: Literal["ray", "inprocess"] = "ray"
    """ray: TaskWorker actors; inprocess: the same code in this process (debugging, reference)."""
    num_workers: PositiveInt = 2
    num_cpus: PositiveFloat = 1.0
    """CPUs reserved per worker actor."""
    num_gpus: NonNegativeFloat = 0.0
    """GPUs per worker actor; fractions let several workers share one GPU."""
    address: str | None = None
    """Ray cluster address; None starts Ray embedded on this machine."""
    max_restarts: int = Field(-1, ge=-1)
    """Restarts per actor (-1: unlimited)."""
    start_timeout_s: PositiveFloat = 600.0
    """How long to wait for workers to be placed (an autoscaler may be adding nodes) before giving up."""
    shares: PositiveInt | None = None
    """Pieces each meta-batch is cut into (default: max_workers, else num_workers). Fixed for a run, so a step's
    result does not depend on how many workers are alive; workers take shares from a queue. Changing it changes
    the sums' rounding, so a run cannot be resumed with another share count."""
    max_workers: PositiveInt | None = None
    """Elastic: grow up to this many workers at step boundaries when the cluster has room (default num_workers).
    The default share count follows it, so workers that join have shares to take."""
    straggler_deadline_s: PositiveFloat | None = None
    """A share still running after this long is also given to an idle worker; the first result wins."""
    learner: Literal["driver", "actor"] = "driver"
    """Where the central learner runs: in this process, or as its own Ray actor (on a cluster whose head node
    runs no work, e.g. under `ray job submit`); it then needs learner_num_cpus/gpus free somewhere."""
    learner_num_cpus: PositiveFloat = 1.0
    learner_num_gpus: NonNegativeFloat = 0.0
    reduce: Literal["flat", "node"] = "flat"
    """flat: the learner receives one gradient per share; node: shares are summed on each node first, so the
    learner receives one (float64) gradient per node (for large models on many workers per node)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where workers compute: auto = cuda when num_gpus > 0 and a GPU is visible."""

    @property
    def share_count(self) -> int:
        return self.shares or self.max_workers or self.num_workers


class EvalConfig(Strict):
    tasks: PositiveInt = 600
    """Held-out tasks, fixed by ``seed`` so every run is scored on the same ones."""
    seed: NonNegativeInt = 2024
    steps: list[NonNegativeInt] = Field([0, 1, 10], min_length=1)
    """Report query loss after these numbers of adaptation steps."""
    inner_lr: PositiveFloat | None = None
    """Adaptation step size at test time (default: algorithm.inner_lr)."""
    probes: dict[str, dict[str, Any]] = {}
    """Extra evaluations on task variants, as overrides of ``task`` (e.g. support_x_range: [0, 5])."""
    batch_tasks: PositiveInt = 100
    """Episodes per worker call during evaluation."""
    every: NonNegativeInt = 0
    """Validate every this many meta-steps (0: never) on val_tasks fixed episodes of the val split (image
    tasks: task.split.val; sine: their own seed stream), keep the best checkpoint (best.pt), and report the
    final test evaluation on it."""
    val_tasks: PositiveInt = 200
    select: Literal["auto", "loss", "acc"] = "auto"
    """The validation metric that picks the best checkpoint: query loss after max(steps) adaptation steps
    (lower is better) or accuracy (higher); auto: acc for classification, else loss."""
    patience: PositiveInt | None = None
    """Stop training after this many validations without improvement (early stopping); None: never."""


class TrackingConfig(Strict):
    enabled: bool = True
    uri: str | None = None
    """Tracking store; default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory."""
    experiment: str | None = None
    """MLflow experiment; default metaray-<task family>."""
    flush_every_s: PositiveFloat = 2.0
    """Metrics are sent in batches at this period (asynchronously)."""
    max_buffered_metrics: PositiveInt = 100_000
    """Most metrics the writer process holds in memory (it reads the run's metric log on disk in chunks)."""
    close_timeout_s: NonNegativeFloat = 120.0
    """At the end of a run, how long to wait for an unreachable store before leaving the rest in the run folder."""
    plots: bool = True
    log_model: bool = True
    log_checkpoint: bool = True
    system_metrics: bool = True
    """CPU, memory, disk and network (GPUs with nvidia-ml-py) as system/* metrics, every 10 s."""
    registered_model: str | None = Field(None, min_length=1)
    """Register the final model under this name in the MLflow model registry (a new version per run)."""


class RunConfig(Strict):
    name: str = Field("sine-maml", pattern=r"^[A-Za-z0-9_.-]+$")
    seed: NonNegativeInt = 0
    dir: str = "runs"
    """Checkpoints go to <dir>/<name>/."""
    checkpoint_every: PositiveInt = 1000
    log_every: PositiveInt = 100


def _default_algorithm() -> AlgorithmConfig:
    return variant("maml")()


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
            name = value.get("name", "maml")
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

