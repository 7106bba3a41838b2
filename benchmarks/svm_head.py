"""MetaOptNet SVM head: forward+backward time per meta-batch, cvxpylayers vs the batched QP, at equal gradients.

For each meta-batch shape (tasks x shot x embedding dim; 5-way, 15 queries per
class) it times the head's forward and backward of the query cross-entropy,
median of ``--repeats`` rounds (the paths alternate, see ``timed``), for

- cvxpylayers (``learners.heads.svm_cvxpy``: one Clarabel solve and one dense diffcp
  derivative per task, float64, always on CPU: diffcp is a CPU library);
- the fast path (``learners.heads.svm_head``: the batched QP of ``learners.heads.qp``,
  active-set steps with the interior point as fallback) at training settings:
  float32 embeddings, QP in float64, ``max_iter=15``, default tolerance, on ``--device``;

and prints the ratio and the largest relative difference (norm-wise, over the
support and the query gradient) between the two paths' gradients, so the speed-up
is read at equal gradients. "products" times the head with a free solver (the
Gram matrix and the readout, forward and backward, alpha given), and "bound" is
cvxpylayers over that: the most any solver could gain. At D = 16000 those
embedding-sized products, which both paths do, are memory bound on CPU and take
most of the time. The "solver" columns time the QP alone (jittered Gram matrix in,
float64, alpha out, backward of a fixed linear function of alpha). Embeddings are
ReLU'd Gaussians (non-negative, like a backbone's output). With ``--run``, the
embeddings are a trained run's instead (its checkpoint's backbone on episodes of
its store): there the SVM's bounds bind and the active set takes several steps,
while on wide random embeddings the solution lies inside the box and one step
solves it. "steps" is the mean number of steps per task (active-set plus, where a
task falls back, interior-point steps); the "interior point" column times
``method="interior_point"`` (the fast path before the active-set steps).

    python benchmarks/svm_head.py [--device cuda] [--tasks 8 32] [--shots 1 5] [--dims 1600 16000] [--threads 1]
    python benchmarks/svm_head.py --run runs/omniglot-metaoptnet-svm-5w5s --tasks 32
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from learners.heads.qp import solve_qp
from learners.heads.svm_cvxpy import svm_dual_cvxpy_gram, svm_logits_cvxpy
from learners.heads.svm_head import dual_readout, support_gram, svm_dual, svm_logits


def episode(tasks: int, n_way: int, shot: int, query: int, dim: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    support = torch.randn(tasks, n_way * shot, dim, generator=g).relu()
    queries = torch.randn(tasks, n_way * query, dim, generator=g).relu()
    support_y = torch.arange(n_way).repeat_interleave(shot).repeat(tasks, 1)
    query_y = torch.arange(n_way).repeat_interleave(query).repeat(tasks, 1)
    return support, support_y, queries, query_y


def trained_episode(run: str, tasks: int, n_way: int, shot: int, query: int):
    """Embeddings of ``tasks`` training episodes under the backbone of ``run``'s checkpoint, as ``episode``."""
    from learners.models.classifier import embed
    from orchestrator.build import build_model, build_tasks
    from orchestrator.run.checkpoint import load
    from tasks.episode import EpisodeIds

    ckpt = load(run)
    task = ckpt.config.task.model_copy(update={"n_way": n_way, "k_shot": shot, "query": query})
    batch = build_tasks(task).sample(EpisodeIds(0, 0, tuple(range(tasks))))
    model = build_model(ckpt.config)[0]
    with torch.no_grad():
        emb = lambda x: torch.stack([embed(model, ckpt.params, xi).flatten(1) for xi in x])  # noqa: E731
        return emb(batch.support_x), batch.support_y, emb(batch.query_x), batch.query_y


def step(head, support, support_y, query, query_y, device: str):
    """One forward+backward of the query loss through ``head``; returns (seconds, grads, ok)."""
    s = support.to(device, copy=True).requires_grad_()  # fresh leaves: no gradient carried between runs
    q = query.to(device, copy=True).requires_grad_()
    sy, qy = support_y.to(device), query_y.to(device)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    logits, ok = head(s, sy, q)
    F.cross_entropy(logits.flatten(0, 1), qy.flatten()).backward()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, (s.grad.double().cpu(), q.grad.double().cpu()), ok.cpu()


def timed(repeats: int, *runs):
    """Median seconds of each zero-argument ``runs[i]`` (returning (seconds, payload)) and its last payload.

    The runs alternate, ``repeats`` rounds, so every path sees the same machine state (at D = 16000
    the time is mostly page faults on fresh embedding-sized gradients, whose cost drifts by 2-3x
    over a process's life on this VM). Within a round each path first runs once untimed: that run
    absorbs the switch (the other path's threads still spinning: numpy's OpenBLAS and torch's
    OpenMP both spin after a call; layer construction and CUDA kernels on the first round).
    """
    seconds: list[list[float]] = [[] for _ in runs]
    last = [None] * len(runs)
    for _ in range(repeats):
        for i, run in enumerate(runs):
            run()
            seconds[i].append((out := run())[0])
            last[i] = out[1:]
    return [(statistics.median(t), *payload) for t, payload in zip(seconds, last)]


def solver_step(solve, P: torch.Tensor, weights: torch.Tensor, device: str):
    """Solver alone: alpha from the jittered Gram P, backward of <weights, alpha>; (seconds, dL/dP)."""
    P = P.to(device, copy=True).requires_grad_()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    (solve(P) * weights.to(device)).sum().backward()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, P.grad.cpu()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def row(tasks: int, shot: int, dim: int, args) -> str:
    """One table row: head timings and gradient difference, then solver-only timings and difference."""
    n = args.way
    if args.run:
        s, sy, q, qy = trained_episode(args.run, tasks, n, shot, args.query)
        dim = s.shape[-1]
    else:
        s, sy, q, qy = episode(tasks, n, shot, args.query, dim, seed=tasks * 1000 + shot * 100 + dim)

    def fast(s, y, q):
        return svm_logits(s, y, q, n)

    def reference(s, y, q):
        return svm_logits_cvxpy(s, y, q, n), torch.ones(s.shape[0], dtype=torch.bool)

    alpha = svm_dual(s, sy, n).x.detach().to(args.device)

    def products(s, y, q):
        """The head with a free solver: its Gram matrix (forward and backward) and readout, alpha given."""
        return dual_readout(q, s, alpha + 0.0 * support_gram(s, 1.0)[..., :1]), torch.ones(s.shape[0], dtype=torch.bool)

    (t_ref, g_ref, _), (t_fast, g_fast, ok), (t_prod, _, _) = timed(
        args.repeats, lambda: step(reference, s.double(), sy, q.double(), qy, "cpu"),
        lambda: step(fast, s, sy, q, qy, args.device), lambda: step(products, s, sy, q, qy, args.device))
    diff = max(rel(a, b) for a, b in zip(g_fast, g_ref))

    P = support_gram(s.double(), 1.0).detach()
    w = torch.randn(tasks, n * shot, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    Y = F.one_hot(sy, n).double().to(args.device)
    b = torch.zeros(tasks, n * shot, dtype=torch.float64, device=args.device)
    (ts_ref, gs_ref), (ts_fast, gs_fast), (ts_ip, _) = timed(
        args.repeats, lambda: solver_step(lambda P: svm_dual_cvxpy_gram(P, sy, n), P, w, "cpu"),
        lambda: solver_step(lambda P: solve_qp(P, -Y, 0.1 * Y, b).x, P, w, args.device),
        lambda: solver_step(lambda P: solve_qp(P, -Y, 0.1 * Y, b, method="interior_point").x, P, w, args.device))
    steps = solve_qp(P.to(args.device), -Y, 0.1 * Y, b).iters.float().mean()
    return (f"{tasks:>5} {shot:>4} {dim:>6} | {1e3 * t_ref:>14.1f} {1e3 * t_fast:>8.2f} {t_ref / t_fast:>7.1f}x "
            f"{diff:>9.1e} {int(ok.sum()):>3}/{tasks:<2} {1e3 * t_prod:>11.2f} {t_ref / t_prod:>7.1f}x | "
            f"{1e3 * ts_ref:>16.1f} {1e3 * ts_fast:>8.2f} "
            f"{ts_ref / ts_fast:>7.1f}x {rel(gs_fast, gs_ref):>9.1e} {float(steps):>5.1f} {1e3 * ts_ip:>17.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--tasks", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    ap.add_argument("--dims", type=int, nargs="+", default=[1600, 16000])
    ap.add_argument("--way", type=int, default=5)
    ap.add_argument("--query", type=int, default=15, help="queries per class")
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds, each path once per round (median)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--run", help="a trained image run (folder or checkpoint): its embeddings instead of random ones")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch")
    if args.threads:
        torch.set_num_threads(args.threads)
    where = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"{args.way}-way, {args.query} queries/class; fast path on {where} ({torch.get_num_threads()} CPU threads), "
          f"cvxpylayers on CPU; forward+backward per meta-batch, median. 'head': embeddings -> query loss; "
          f"'solver': Gram matrix -> alpha only")
    print(f"{'tasks':>5} {'shot':>4} {'dim':>6} | {'head: cvxpy ms':>14} {'fast ms':>8} {'speed-up':>8} "
          f"{'grad diff':>9} {'ok':>6} {'products ms':>11} {'bound':>8} | "
          f"{'solver: cvxpy ms':>16} {'fast ms':>8} {'speed-up':>8} {'grad diff':>9} "
          f"{'steps':>5} {'interior point ms':>17}")
    for tasks in args.tasks:
        for shot in args.shots:
            for dim in args.dims[:1] if args.run else args.dims:
                print(row(tasks, shot, dim, args), flush=True)


if __name__ == "__main__":
    main()
