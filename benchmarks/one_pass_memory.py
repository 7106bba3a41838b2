"""Memory of the onepass strategy against the per-task loop and vmap: peak growth of one meta-gradient on the CPU.

Head-only learners (ProtoNet, MetaOptNet-SVM) on Conv-4 and ResNet-12, 5-way 1-shot with 15 queries per class on
28x28 single-channel images (Omniglot's shape), ``--tasks`` tasks per meta-gradient; each point runs in a fresh
process with one thread, and its memory is the growth of the process's maximum RSS over one meta-gradient (after a
first, untimed one on 1 task has allocated the model and the allocator's pools). ``onepass/N`` is onepass with
``algorithm.tasks_per_pass: N``. On a GPU ``benchmarks/gpu_check.py`` prints the same comparison as peak GPU memory.

    python benchmarks/one_pass_memory.py --tasks 8
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = ("loop", "vmap", "onepass", "onepass/2")


def point(algorithm: str, backbone: str, strategy: str, tasks: int) -> dict:
    """One meta-gradient in this process: peak RSS growth (MB) and seconds."""
    import time

    import torch

    from learners.models.classifier import Classifier
    from learners.models.conv4 import Conv4
    from learners.models.resnet12 import ResNet12
    from learners.objective import CrossEntropy
    from learners.registry import Parts, variant
    from tasks.episode import EpisodeBatch

    torch.set_num_threads(1)
    with torch.device("meta"):
        if backbone == "resnet12":
            net = ResNet12(1)
            model = Classifier(net, net.out_features((1, 28, 28)), 5)
        else:
            model = Conv4(1, 28, 5)
    name, _, per_pass = strategy.partition("/")
    parts = Parts(model, CrossEntropy(), 28 * 28, 5, name, int(per_pass) if per_pass else None)
    alg = variant(algorithm)(name=algorithm).build(parts)
    params = alg.init_params(0)
    g = torch.Generator().manual_seed(0)

    def batch(t: int) -> EpisodeBatch:
        return EpisodeBatch((torch.rand(t, 5, 1, 28, 28, generator=g) > 0.8).float(), torch.arange(5).repeat(t, 1),
                            (torch.rand(t, 75, 1, 28, 28, generator=g) > 0.8).float(),
                            torch.arange(5).repeat_interleave(15).repeat(t, 1))

    alg.meta_gradient(params, batch(1))
    share = batch(tasks)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    alg.meta_gradient(params, share)
    seconds = time.perf_counter() - start
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    return {"mb": grown / 1024, "s": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--algorithms", default="protonet,metaoptnet-svm")
    ap.add_argument("--backbones", default="conv4,resnet12")
    ap.add_argument("--point", nargs=4, help=argparse.SUPPRESS)  # algorithm backbone strategy tasks: one point
    args = ap.parse_args()
    if args.point:
        algorithm, backbone, strategy, tasks = args.point
        print(json.dumps(point(algorithm, backbone, strategy, int(tasks))))
        return
    print(f"{args.tasks} tasks per meta-gradient, 5-way 1-shot, 15 queries per class, 28x28x1; peak RSS growth of "
          "one meta-gradient in a fresh process (one thread)")
    print(f"{'algorithm':<16}{'backbone':<10}" + "".join(f"{s + ' MB':>14}" for s in STRATEGIES))
    for algorithm in args.algorithms.split(","):
        for backbone in args.backbones.split(","):
            cells = []
            for strategy in STRATEGIES:
                done = subprocess.run([sys.executable, __file__, "--point", algorithm, backbone, strategy,
                                       str(args.tasks)], capture_output=True, text=True, cwd=ROOT)
                cells.append(f"{json.loads(done.stdout)['mb']:.0f}" if done.returncode == 0 else "failed")
            print(f"{algorithm:<16}{backbone:<10}" + "".join(f"{c:>14}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
