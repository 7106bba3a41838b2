"""The sections of the run config other than task and algorithm: model, outer loop, workers, evaluation,
tracking, run. Each is strict (``base.Strict``) and documents its keys."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, field_serializer

from orchestrator.config.base import Strict
from orchestrator.config.lr_schedule import ConstantSchedule, Schedule


class ModelConfig(Strict):
    backbone: Literal["mlp", "conv4", "resnet12"] = "mlp"
    """mlp for vector tasks (sine); conv4 or resnet12 (MetaOptNet's 64-160-320-640) for images."""
    hidden: list[PositiveInt] = [40, 40]
    """Hidden layer widths of the MLP (the MAML sine regressor is [40, 40]); mlp only."""
    width: PositiveInt = 64
    """Filters per Conv-4 block (64 in most papers; MAML used 32 on miniImageNet); conv4 only."""
    precision: Literal["float32", "bfloat16"] = "float32"
    """bfloat16: the workers run the backbone under bfloat16 autocast (mixed precision); parameters, gradients
    and the sums over tasks stay float32."""
    tf32: Literal["auto"] | bool = "auto"
    """CUDA: TF32 for float32 matmuls and convolutions (a 10-bit mantissa: ~1e-3 relative per product; the tests
    compare against float32 without it); auto: as measured for the backbone (orchestrator/build.py)."""
    channels_last: Literal["auto"] | bool = "auto"
    """CUDA: images and activations in channels-last (NHWC) layout, the convolutions' fastest on tensor cores;
    same numbers up to rounding; auto: as measured for the backbone."""
    cudnn_benchmark: Literal["auto"] | bool = "auto"
    """CUDA: cuDNN times its convolution algorithms on the first call of each shape and keeps the fastest (may
    pick a non-deterministic one); auto: as measured for the backbone."""


OPTIMIZER_KEYS = {"adam": (), "sgd": ("momentum", "nesterov")}
"""The outer-loop keys only one optimizer reads."""


class OuterConfig(Strict):
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: PositiveFloat = 1e-3
    momentum: float = Field(0.0, ge=0.0, lt=1.0)
    """SGD momentum (MetaOptNet: 0.9 with Nesterov); Adam ignores it."""
    nesterov: bool = False
    """SGD only."""
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


def mask_secrets(text: str) -> str:
    """``http://user:secret@host`` -> ``http://user:***@host`` wherever a URI in ``text`` carries a password."""
    return re.sub(r"(://[^/\s:@]*):[^/\s@]+@", r"\1:***@", text)


class TrackingConfig(Strict):
    enabled: bool = True
    uri: str | None = None
    """Tracking store; default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory. A password
    in it (http://user:password@host) is used, never saved: params, config.yaml and checkpoints show ***."""
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

    @field_serializer("uri")
    def _masked(self, uri: str | None) -> str | None:
        return None if uri is None else mask_secrets(uri)


class RunConfig(Strict):
    name: str = Field("sine-maml", pattern=r"^[A-Za-z0-9_.-]+$")
    seed: NonNegativeInt = 0
    dir: str = "runs"
    """Checkpoints go to <dir>/<name>/."""
    checkpoint_every: PositiveInt = 1000
    log_every: PositiveInt = 100
