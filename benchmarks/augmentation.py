"""What seed-addressed augmentation costs a Conv-4 Omniglot meta-step: per-step time with and without, as a ratio.

A step is what one worker does for its share: sample the episodes (with their augmentation) and compute
their summed meta-gradient, ``TaskWorker.meta_gradient``, in this process with one torch thread (a Ray
worker with ``num_cpus: 1`` runs one). Plain and augmented steps alternate, on the same episode ids, so
a busy machine slows both alike; ``ratio`` is augmented / plain of the medians. On a machine shared with other
work that ratio is noisy (steps vary by more than the augmentation costs), so the augmentation's own cost is also
measured where it happens: sampling the same episodes with and without it (``sample ms``), its difference as a
fraction of the plain step (``aug cost``).

Omniglot here is a synthetic store of the real shape (28x28 greyscale, 20 drawings per character,
alphabets of 20 characters): the cost depends on shapes, not pixels. The augmentation is the Omniglot
recipe's random affine map (rotation, shear, scale, translation) on support and query.

    python benchmarks/augmentation.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from learners.params import ParamSpec
from orchestrator.config import parse_config
from orchestrator.workers.worker import TaskWorker
from tasks.episode import EpisodeIds
from tasks.store_writer import StoreWriter

AFFINE = {"affine": {"degrees": 10.0, "shear": 10.0, "scale": [0.9, 1.1], "translate": 0.1}}

# (label, algorithm section, task shape, meta_batch_size)
CASES = [
    ("protonet 20w1s5q (shipped)", {"name": "protonet"}, {"n_way": 20, "k_shot": 1, "query": 5}, 4),
    ("protonet 60w5s5q (paper)", {"name": "protonet"}, {"n_way": 20, "k_shot": 1, "query": 5,
                                                        "train": {"n_way": 60, "k_shot": 5}}, 1),
    ("maml 5w1s15q, 1 step", {"name": "maml", "inner_steps": 1, "inner_lr": 0.4},
     {"n_way": 5, "k_shot": 1, "query": 15}, 32),
]


def synthetic_omniglot(path: Path, alphabets: int = 20, characters: int = 20) -> Path:
    rng = np.random.default_rng(0)
    with StoreWriter(path, (1, 28, 28), source="synthetic", preprocessing="28x28") as w:
        for a in range(alphabets):
            for c in range(characters):
                strokes = (rng.random((20, 1, 28, 28)) < 0.15).astype(np.uint8) * 255
                w.add_class(f"alphabet{a:02d}/character{c:02d}", f"alphabet{a:02d}", strokes)
    return path


def worker(store: Path, algorithm: dict, task: dict, batch: int, augment: bool) -> TaskWorker:
    cfg = parse_config({
        "task": {"family": "images", "store": str(store), "rotations": True,
                 "split": {"by": "group", "train": 0.8, "test": 0.2}, **task,
                 **({"augment": AFFINE} if augment else {})},
        "model": {"backbone": "conv4"},
        "algorithm": algorithm,
        "outer": {"meta_batch_size": batch},
        "workers": {"mode": "inprocess", "num_workers": 1},
    })
    return TaskWorker(cfg.model_dump(mode="json"), index=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="steps timed per variant (median reported)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        store = synthetic_omniglot(Path(tmp) / "omniglot.arrow")
        print(f"{'case':<28} {'plain ms':>9} {'augmented ms':>13} {'ratio':>6} {'sample ms':>10} "
              f"{'aug sample ms':>14} {'aug cost':>9}")
        for label, algorithm, task, batch in CASES:
            pair = [worker(store, algorithm, task, batch, augment) for augment in (False, True)]
            theta = ParamSpec.of(pair[0].algorithm.init_params(0)).flatten(pair[0].algorithm.init_params(0))
            theta = theta.numpy().astype(np.float32)
            step_ms: list[list[float]] = [[], []]
            sample_ms: list[list[float]] = [[], []]
            for r in range(args.repeats + 1):  # the first round warms up (lazy imports, class checks)
                ids = EpisodeIds(seed=0, step=r, indices=tuple(range(batch)))
                for k, w in enumerate(pair):
                    start = time.perf_counter()
                    w.meta_gradient(theta, ids)
                    middle = time.perf_counter()
                    w._source("train").sample(ids)
                    end = time.perf_counter()
                    if r:
                        step_ms[k].append((middle - start) * 1e3)
                        sample_ms[k].append((end - middle) * 1e3)
            plain, augmented = (statistics.median(v) for v in step_ms)
            sample, aug_sample = (statistics.median(v) for v in sample_ms)
            print(f"{label:<28} {plain:9.1f} {augmented:13.1f} {augmented / plain:6.3f} {sample:10.1f} "
                  f"{aug_sample:14.1f} {(aug_sample - sample) / plain:9.1%}")


if __name__ == "__main__":
    main()
