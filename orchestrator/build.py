"""From a validated config to the objects a learner or worker runs: task source, model, algorithm.

Workers and the central learner build identical objects from the same config here. Algorithms
build themselves from their config variant (``learners.registry``); this module only resolves
what they are built from (``Parts``).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from learners.algorithm import Algorithm
from learners.models.build import task_model
from learners.objective import Objective
from learners.predictor import Blueprint
from learners.registry import Parts
from orchestrator.config import Config, ConfigError
from orchestrator.config.task import ImageTaskConfig, SineTaskConfig, TaskConfig
from tasks.episode import Purpose, TaskSource
from tasks.sine import SineTasks

# Per-task strategy when algorithm.strategy is "auto", by (device, backbone). CPU: measured on this project's
# 2-core CPU (benchmarks/throughput.py): vmap ~10x faster than a loop for the sine MLP; a loop 1.5-2x faster
# than vmap for Conv-4 (ProtoNet, FOMAML, ANIL, MAML alike). CUDA: measured on one H100 (benchmarks/gpu_check.py,
# README "GPU check"): vmap 11-46x faster than a loop for the MLP and Conv-4; for ResNet-12 at 84x84 the two run
# at the same speed (loop 0.96-1.24x vmap) and the loop needs 1.5-8x less GPU memory (5.5 vs 44 GB, ProtoNet 1-shot).
AUTO_STRATEGY = {
    ("cpu", "mlp"): "vmap", ("cpu", "conv4"): "loop", ("cpu", "resnet12"): "loop",
    ("cuda", "mlp"): "vmap", ("cuda", "conv4"): "vmap", ("cuda", "resnet12"): "loop",
}
# The same for head-only learners (an algorithm config whose one_pass() is true), which can also run onepass;
# a (device, backbone) not listed takes AUTO_STRATEGY's entry. CPU: none listed: on this project's 2-core CPU one
# pass over a whole share was 0.5-0.6x the loop for Conv-4 ProtoNet and MetaOptNet-SVM (its activations outgrow
# the caches; one task per pass matched the loop), and no faster for ResNet-12 (docs/performance.md, "One
# backbone pass"). CUDA: not measured yet (benchmarks/gpu_check.py times it).
AUTO_HEAD_ONLY: dict[tuple[str, str], str] = {}

# CUDA speed options when model.tf32 / channels_last / cudnn_benchmark are "auto", by backbone. Off until
# benchmarks/gpu_check.py measures them on a GPU (its "speed options" table: the fastest setting within the
# stated tolerance); TF32 off is full float32, what the tests compare CUDA against.
CUDA_DEFAULTS: dict[str, dict[str, bool]] = {
    "mlp": {"tf32": False, "channels_last": False, "cudnn_benchmark": False},
    "conv4": {"tf32": False, "channels_last": False, "cudnn_benchmark": False},
    "resnet12": {"tf32": False, "channels_last": False, "cudnn_benchmark": False},
}

Split = Literal["train", "val", "test", "eval"]
"""Whose episodes: training's, a named split's, or evaluation's (``task.eval_split``)."""

SHAPE_KEYS = ("n_way", "k_shot", "query", "within_group")


def build_tasks(task: TaskConfig, split: Split = "train") -> TaskSource:
    """Episodes of ``split``: the classes meta-training may see, or the held-out ones (images).

    Training episodes take the ``task.train`` overrides and ``task.augment``; the others take the task's own
    shape, augmented only with ``task.augment.at_eval``. A data problem is a ``DataError`` naming the config key.
    """
    if isinstance(task, SineTaskConfig):
        return SineTasks(**task.model_dump(exclude={"family"}))
    if isinstance(task, ImageTaskConfig):
        return _image_tasks(task, split)
    raise ValueError(f"no task source for family {task.family!r}")


def episode_shape(task: ImageTaskConfig, split: Split) -> tuple[dict[str, Any], dict[str, str]]:
    """(n_way, k_shot, query, within_group) of ``split``'s episodes, and the config key each comes from."""
    values, keys = {}, {}
    for name in SHAPE_KEYS:
        override = getattr(task.train, name) if split == "train" else None
        values[name] = getattr(task, name) if override is None else override
        keys[name] = f"task.{name}" if override is None else f"task.train.{name}"
    return values, keys


def _split_classes(task: ImageTaskConfig):
    """(the store, its class splits), each data problem a ``DataError`` naming the config key."""
    from tasks.splits import split_classes
    from tasks.store import DataError, ImageStore

    try:
        store = ImageStore.open(task.store)
    except DataError as e:
        raise DataError(f"task.store: {e}") from None
    s = task.split
    try:
        return store, split_classes(store, by=s.by, train=s.train, val=s.val, test=s.test, seed=s.seed)
    except DataError as e:
        # split_classes names the split first ('train: unknown group names ...'): that is task.split.train.
        text = str(e)
        named = text.split(":")[0].split("=")[0] in ("train", "val", "test")
        raise DataError(f"task.split.{text}" if named else f"task.split: {text}") from None


def _augment(task: ImageTaskConfig, split: Split):
    from tasks.augment import Affine, Augment, Jitter

    a = task.augment
    if a is None or not (split == "train" or a.at_eval):
        return None
    return Augment(crop_padding=a.crop_padding, flip=a.flip,
                   jitter=Jitter(**a.jitter.model_dump()) if a.jitter else None,
                   affine=Affine(**a.affine.model_dump()) if a.affine else None)


def _image_tasks(task: ImageTaskConfig, split: Split) -> TaskSource:
    # Imported here so sine runs never load pyarrow.
    from tasks.fewshot import FewShotTasks

    store, classes = _split_classes(task)
    name = task.eval_split if split == "eval" else split
    shape, keys = episode_shape(task, split)
    a = task.augment
    return FewShotTasks(store, shape["n_way"], shape["k_shot"], shape["query"], getattr(classes, name),
                        rotations=task.rotations, within_group=shape["within_group"], augment=_augment(task, split),
                        augment_support=a is not None and a.support, augment_query=a is not None and a.query,
                        keys=keys, where=f"the {name} split")


def train_purpose(cfg: Config) -> Purpose:
    """What a meta-step's ids address: minibatches of training images for an algorithm that asks for them
    (``algorithm.minibatch()``), else training episodes."""
    return Purpose.BATCH if cfg.algorithm.minibatch() is not None else Purpose.TRAIN


def build_batches(cfg: Config, augment: bool = True) -> TaskSource:
    """Seed-addressed minibatches of the training split's images with their split-global labels
    (``tasks.minibatch``): ``algorithm.minibatch()`` images per task, ``outer.meta_batch_size`` tasks per step."""
    from tasks.minibatch import ImageBatches

    task = cfg.task
    if not isinstance(task, ImageTaskConfig):
        raise ConfigError(f"algorithm.name: {cfg.algorithm.name} trains on minibatches of images; use task.family: "
                          "images")
    store, classes = _split_classes(task)
    return ImageBatches(store, classes.train, cfg.algorithm.minibatch() or 1, cfg.outer.meta_batch_size,
                        rotations=task.rotations, augment=_augment(task, "train") if augment else None,
                        key="algorithm.images_per_task")


def build_source(cfg: Config, split: Split, purpose: Purpose, task: TaskConfig | None = None) -> TaskSource:
    """Where ids of ``purpose`` are drawn: training minibatches (``Purpose.BATCH``), or episodes of ``split``
    (of ``task``, default ``cfg.task``: a probe's variant)."""
    if purpose == Purpose.BATCH:
        return build_batches(cfg)
    return build_tasks(task or cfg.task, split)


def check_tasks(cfg: Config, splits: tuple[Split, ...] = ("train", "eval")) -> None:
    """Build each split's episodes once, before a run starts: every data problem in one line naming its key.

    Also refuses training episodes of another n_way than evaluation's for an algorithm whose head is in θ (its
    parameter shapes depend on n_way), found by building the algorithm for both shapes: no list of names.
    """
    from tasks.store import DataError

    problems: list[str] = []
    for split in splits:
        try:
            build_source(cfg, split, train_purpose(cfg) if split == "train" else Purpose.EVAL)
        except DataError as e:
            if str(e) not in problems:
                problems.append(str(e))
            if str(e).startswith(("task.store:", "task.split")):
                break  # the same for every split
    episodes = train_purpose(cfg) == Purpose.TRAIN
    if not problems and episodes and isinstance(cfg.task, ImageTaskConfig) \
            and cfg.task.train.n_way not in (None, cfg.task.n_way):
        train = {k: tuple(v.shape) for k, v in build_algorithm(cfg, "train").init_params(0).items()}
        test = {k: tuple(v.shape) for k, v in build_algorithm(cfg, "eval").init_params(0).items()}
        differ = [k for k in test if train.get(k) != test[k]]  # in θ's own order
        if differ:
            raise ConfigError(f"task.train.n_way: {cfg.task.train.n_way} differs from task.n_way={cfg.task.n_way}, "
                              f"but {cfg.algorithm.name} meta-learns an n_way-sized head ({differ[0]} is "
                              f"{list(test[differ[0]])} for evaluation); train with task.n_way, or use an "
                              "algorithm that writes its head from each support set")
    if problems:
        raise DataError("; ".join(problems))


def build_model(cfg: Config, n_way: int | None = None) -> tuple[nn.Module, Objective, int]:
    """The task model (structure only, on the meta device), its objective, and its input width.

    Its head has ``n_way`` outputs (default: the evaluation episodes', ``task.n_way``).
    """
    shape = None
    if not isinstance(cfg.task, SineTaskConfig):
        from tasks.store import ImageStore

        shape = ImageStore.open(cfg.task.store).image_shape
        if shape[1] < 16:
            raise ConfigError(f"model.backbone: {cfg.model.backbone} pools 4 times and needs images of at least "
                              f"16x16; {cfg.task.store} holds {shape[1]}x{shape[1]} (convert with --size 28 or more)")
        n_way = n_way or cfg.task.n_way
    m = cfg.model
    return task_model(m.backbone, hidden=m.hidden, width=m.width, image_shape=shape, n_way=n_way)


def build_algorithm(cfg: Config, split: Split = "eval", device: torch.device | str = "cpu") -> Algorithm:
    """The algorithm for ``split``'s episodes (its n_way is theirs: training's may differ, ``task.train.n_way``),
    its per-task strategy resolved for the ``device`` it computes on."""
    n_way = episode_shape(cfg.task, split)[0]["n_way"] if isinstance(cfg.task, ImageTaskConfig) else None
    model, objective, in_features = build_model(cfg, n_way)
    a = cfg.algorithm
    train_classes, training_images = _train_classes(cfg), None
    if train_classes is not None:

        def training_images() -> TaskSource:
            return build_batches(cfg, augment=False)

    return a.build(Parts(model, objective, in_features, n_way, resolve_strategy(cfg, device), a.tasks_per_pass,
                         train_classes, training_images))


def _train_classes(cfg: Config) -> int | None:
    """The training split's classes (times 4 with rotations), for an algorithm that trains on their global
    labels (``algorithm.minibatch()``); else None."""
    if not isinstance(cfg.task, ImageTaskConfig) or cfg.algorithm.minibatch() is None:
        return None
    _, classes = _split_classes(cfg.task)
    return len(classes.train) * (4 if cfg.task.rotations else 1)


def cuda_options(cfg: Config) -> dict[str, bool]:
    """model.tf32, channels_last and cudnn_benchmark, "auto" resolved for the backbone (``CUDA_DEFAULTS``);
    they apply where a worker computes on CUDA (``orchestrator.workers.worker``)."""
    measured = CUDA_DEFAULTS[cfg.model.backbone]
    return {k: measured[k] if getattr(cfg.model, k) == "auto" else getattr(cfg.model, k) for k in measured}


def resolve_strategy(cfg: Config, device: torch.device | str = "cpu") -> str:
    """``algorithm.strategy``, with auto resolved for the backbone on ``device`` (``AUTO_STRATEGY``)."""
    a = cfg.algorithm
    if a.strategy != "auto":
        return a.strategy
    key = (torch.device(device).type, cfg.model.backbone)
    return AUTO_HEAD_ONLY.get(key, AUTO_STRATEGY[key]) if a.one_pass() else AUTO_STRATEGY[key]


def blueprint(cfg: Config) -> Blueprint:
    """What the logged model rebuilds the evaluation's algorithm from (``learners.predictor``), as plain data."""
    m, image = cfg.model, None
    if isinstance(cfg.task, ImageTaskConfig):
        from tasks.store import ImageStore

        store = ImageStore.open(cfg.task.store)
        # The converters say in words how they made the pixels; Omniglot's are inverted (strokes bright).
        image = {"shape": list(store.image_shape), "invert": "inverted" in store.preprocessing,
                 "preprocessing": store.preprocessing}
    return Blueprint(algorithm=cfg.algorithm.model_dump(mode="json"), backbone=m.backbone, hidden=list(m.hidden),
                     width=m.width, image=image, n_way=cfg.task.n_way if image else None,
                     eval_lr=cfg.eval.inner_lr or cfg.algorithm.inner_lr, train_classes=_train_classes(cfg))
