"""iMAML on Omniglot against an independent implementation, on the same episodes: where does it learn less than MAML?

The reference is written here from the papers and the authors' code, with ``torch.nn`` modules, ``torch.optim``
and ``torch.autograd`` (nothing of ``learners/`` but the Conv-4 it trains and its initialization, so that both
start from the same θ). Its variants:

- ``paper``: the paper's algorithm as written (Rajeswaran et al. 2019, Alg. 2; TorchOpt's iMAML example):
  ``inner_steps`` SGD steps on L_support(φ) + λ/2 |φ − θ|², then (I + H/λ) v = ∇L_query(φ) by ``cg_steps`` of
  conjugate gradient. metaray's ``imaml`` computes the same thing with ``torch.func``; its row should agree.
- ``authors``: what the authors' Omniglot example (imaml_dev, ``examples/omniglot_implicit_maml.py``) runs:
  ``inner_steps`` plain SGD steps on L_support alone, then ONE SGD step on λ/2 |φ − θ|² (a pull back by
  ``inner_lr`` · λ of the way), and CG on the damped matrix (1 + cg_damping) I + H / (λ + 10) (their
  ``matrix_evaluator`` with cg_damping 1 and lam_damping 10: 2I + H/12), Adam with eps 1e-3. They test with
  plain SGD steps (λ = 0).
- ``authors-inner`` and ``authors-cg``: one half of ``authors`` each (its inner loop with the paper's CG; the
  paper's inner loop with its damped CG), to tell which half matters.

Beside them, metaray's own ``maml`` and ``imaml`` are trained on the same episodes through the learner
(``CentralLearner`` over an in-process group), with their shipped configs (``imaml``, or ``imaml-pullback``
naming its settings: the authors' inner loop and damping, ``algorithm.inner=pullback``, ``cg_damping=1``,
``lam_damping=10``; its outer Adam keeps eps 1e-8), and ``imaml-proximal``: the paper's formula
(``algorithm.inner=proximal``, no damping). Every row prints the training query
accuracy after adaptation (mean over windows of meta-steps: metaray's inner/acc_after) and the held-out accuracy
after adaptation on the same ``--eval-tasks`` test episodes.

    nice -n 10 python benchmarks/imaml_reference.py --store data/omniglot-small.arrow --steps 100
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from learners.params import init_params, materialize
from orchestrator.build import build_algorithm, build_model, build_tasks
from orchestrator.config import load_config
from orchestrator.run.central_learner import CentralLearner
from orchestrator.run.evaluation import evaluate
from orchestrator.workers.group import LocalGroup
from tasks.episode import EpisodeIds, Purpose

TRAIN = "[Japanese_(katakana), Sanskrit, Latin, Balinese, Early_Aramaic, Tagalog]"
TEST = "[Greek, Korean]"
VARIANTS = {  # proximal inner loop, pull-back step, CG matrix (scale of I, λ's damping), Adam eps
    "paper": dict(proximal=True, pullback=False, identity=1.0, lam_damping=0.0, eps=1e-8),
    "authors": dict(proximal=False, pullback=True, identity=2.0, lam_damping=10.0, eps=1e-3),
    "authors-inner": dict(proximal=False, pullback=True, identity=1.0, lam_damping=0.0, eps=1e-8),
    "authors-cg": dict(proximal=True, pullback=False, identity=2.0, lam_damping=10.0, eps=1e-3),
}


class Reference:
    """iMAML with a stateful module: the inner loop steps ``net`` in place from θ; the meta-gradient is solved
    by CG on Hessian-vector products of the support loss at the adapted point."""

    def __init__(self, net: torch.nn.Module, theta: dict[str, torch.Tensor], steps: int, lr: float, lam: float,
                 cg_steps: int, proximal: bool, pullback: bool, identity: float, lam_damping: float, eps: float,
                 outer_lr: float):
        self.net, self.steps, self.lr, self.lam, self.cg_steps = net, steps, lr, lam, cg_steps
        self.proximal, self.pullback, self.identity, self.lam_damping = proximal, pullback, identity, lam_damping
        self.theta = [theta[k].clone().requires_grad_() for k, _ in net.named_parameters()]
        self.outer = torch.optim.Adam(self.theta, lr=outer_lr, eps=eps)

    def _reset(self) -> None:
        with torch.no_grad():
            for p, t in zip(self.net.parameters(), self.theta):
                p.copy_(t)

    def _prox(self) -> torch.Tensor:
        return sum(0.5 * self.lam * ((p - t.detach()) ** 2).sum() for p, t in zip(self.net.parameters(), self.theta))

    def adapt(self, x: torch.Tensor, y: torch.Tensor, proximal: bool, pullback: bool, steps: int) -> None:
        self._reset()
        sgd = torch.optim.SGD(self.net.parameters(), lr=self.lr)
        for _ in range(steps):
            sgd.zero_grad()
            loss = F.cross_entropy(self.net(x), y) + (self._prox() if proximal else 0.0)
            loss.backward()
            sgd.step()
        if pullback:
            sgd.zero_grad()
            self._prox().backward()
            sgd.step()

    def _hvp(self, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        params = list(self.net.parameters())
        g = torch.autograd.grad(F.cross_entropy(self.net(x), y), params, create_graph=True)
        flat = torch.cat([a.reshape(-1) for a in g])
        return torch.cat([a.reshape(-1) for a in torch.autograd.grad(flat @ v, params)])

    def task_gradient(self, sx, sy, qx, qy) -> tuple[torch.Tensor, float]:
        self.adapt(sx, sy, self.proximal, self.pullback, self.steps)
        logits = self.net(qx)
        acc = float((logits.argmax(-1) == qy).float().mean())
        b = torch.cat([a.reshape(-1) for a in torch.autograd.grad(F.cross_entropy(logits, qy),
                                                                   list(self.net.parameters()))])
        scale = self.lam + self.lam_damping
        return cg(lambda v: self.identity * v + self._hvp(sx, sy, v) / scale, b, self.cg_steps), acc

    def meta_step(self, batch) -> float:
        grads, accs = zip(*(self.task_gradient(*(t[i] for t in (batch.support_x, batch.support_y, batch.query_x,
                                                                 batch.query_y))) for i in range(len(batch))))
        mean = torch.stack(grads).mean(0)
        offset = 0
        for t in self.theta:
            t.grad = mean[offset:offset + t.numel()].view_as(t).clone()
            offset += t.numel()
        self.outer.step()
        return float(np.mean(accs))

    def test_accuracy(self, batch, steps: int) -> np.ndarray:
        """Query accuracy after the variant's own test-time adaptation (the authors': plain SGD, λ = 0)."""
        out = []
        for i in range(len(batch)):
            self.adapt(batch.support_x[i], batch.support_y[i], self.proximal, False, steps)
            with torch.no_grad():
                out.append(float((self.net(batch.query_x[i]).argmax(-1) == batch.query_y[i]).float().mean()))
        return np.asarray(out)


def cg(matvec, b: torch.Tensor, steps: int) -> torch.Tensor:
    """Conjugate gradient for A x = b from x = 0 (as imaml_dev's ``cg_solve``)."""
    x, r = torch.zeros_like(b), b.clone()
    p, rr = r.clone(), r @ r
    for _ in range(steps):
        ap = matvec(p)
        alpha = rr / (p @ ap)
        x, r = x + alpha * p, r - alpha * ap
        rr_next = r @ r
        p, rr = r + (rr_next / rr) * p, rr_next
    return x


def windows(values: list[float], width: int) -> str:
    return " ".join(f"{np.mean(values[i:i + width]):.2f}" for i in range(0, len(values), width))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--steps", type=int, default=100, help="meta-steps per row")
    ap.add_argument("--meta-batch", type=int, default=8)
    ap.add_argument("--query", type=int, default=15, help="query images per class, training and test")
    ap.add_argument("--eval-tasks", type=int, default=200)
    ap.add_argument("--window", type=int, default=25)
    ap.add_argument("--rows", default="maml,imaml-proximal,imaml-pullback," + ",".join(VARIANTS))
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="more overrides of the iMAML config")
    args = ap.parse_args()
    torch.set_num_threads(1)
    common = [f"task.store={args.store}", f"task.split.train={TRAIN}", f"task.split.test={TEST}",
              f"outer.meta_batch_size={args.meta_batch}", f"task.query={args.query}", f"outer.steps={args.steps}",
              "workers.mode=inprocess", "workers.num_workers=1", "tracking.enabled=false",
              f"eval.tasks={args.eval_tasks}"]
    authors = ["algorithm.inner=pullback", "algorithm.cg_damping=1.0", "algorithm.lam_damping=10.0"]
    formula = ["algorithm.inner=proximal", "algorithm.cg_damping=0.0", "algorithm.lam_damping=0.0"]
    imaml = "configs/omniglot-imaml-5w1s.yaml"
    configs = {"maml": load_config("configs/omniglot-maml-5w1s.yaml", common),
               "imaml": load_config(imaml, common + args.overrides),
               "imaml-pullback": load_config(imaml, common + authors + args.overrides),
               "imaml-proximal": load_config(imaml, common + formula + args.overrides)}
    cfg = configs["imaml"]
    train = build_tasks(cfg.task, "train")
    test = build_tasks(cfg.task, "eval").sample(EpisodeIds(cfg.eval.seed, 0, tuple(range(args.eval_tasks)),
                                                           Purpose.EVAL))
    a = cfg.algorithm
    print(f"{args.steps} meta-steps of {args.meta_batch} 5-way 1-shot episodes ({args.query} queries per class), "
          f"the same for every row; held-out: {args.eval_tasks} episodes of {TEST}")
    print(f"\n| row | training query acc after adaptation, per {args.window} steps | held-out acc after "
          f"adaptation | s |")
    print("|---|---|---|---|")
    for row in args.rows.split(","):
        start = time.perf_counter()
        if row in configs:
            c = configs[row]
            learner = CentralLearner(c, build_algorithm(c).init_params(c.run.seed), LocalGroup(c))
            accs = [learner.meta_step()["inner/acc_after"] for _ in range(args.steps)]
            steps = max(c.eval.steps)
            held = evaluate(c, LocalGroup(c), learner.theta())["acc"][:, steps]
            label = f"metaray {row} ({steps} test steps)"
        else:
            model = build_model(cfg)[0]
            theta = init_params(model, cfg.run.seed)
            ref = Reference(materialize(model, theta).train(), theta, a.inner_steps, a.inner_lr, a.lam, a.cg_steps,
                            outer_lr=cfg.outer.lr, **VARIANTS[row])
            accs = [ref.meta_step(train.sample(EpisodeIds(cfg.run.seed, s, tuple(range(args.meta_batch)))))
                    for s in range(args.steps)]
            held = ref.test_accuracy(test, a.inner_steps)
            label = f"reference {row}"
        ci = 1.96 * held.std(ddof=1) / np.sqrt(len(held))
        print(f"| {label} | {windows(accs, args.window)} | {held.mean():.3f} ± {ci:.3f} | "
              f"{time.perf_counter() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main()
