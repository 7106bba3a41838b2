"""MetaOptNet SVM head: the fast batched QP path against cvxpylayers, finite differences and the KKT conditions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from learners.heads.qp import kkt_residuals, solve_qp
from learners.heads.svm_cvxpy import svm_dual_cvxpy_gram, svm_logits_cvxpy
from learners.heads.svm_head import one_hot, support_gram, svm_dual, svm_logits
from learners.models.mlp import MLP
from learners.params import init_params

TIGHT = {"max_iter": 60, "tol": 1e-12}
pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]  # inside cvxpylayers


def episode(tasks: int, n_way: int, k_shot: int, n_query: int, dim: int, seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    support = torch.randn(tasks, n_way * k_shot, dim, generator=g, dtype=dtype)
    query = torch.randn(tasks, n_query, dim, generator=g, dtype=dtype)
    labels = torch.stack([torch.randperm(n_way * k_shot, generator=g) % n_way for _ in range(tasks)])
    return support, labels, query


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


def logits_and_grads(head, support, labels, query, weights):
    s, q = support.clone().requires_grad_(), query.clone().requires_grad_()
    out = head(s, labels, q)
    logits = out[0] if isinstance(out, tuple) else out
    (logits * weights.to(logits.dtype)).sum().backward()
    return logits, s.grad, q.grad, out[1] if isinstance(out, tuple) else None


@pytest.mark.parametrize("n_way,k_shot,tasks,seed,solver_args", [
    (5, 1, 3, 0, None), (5, 1, 3, 1, None), (5, 5, 3, 0, None), (5, 5, 3, 1, None),
    (20, 1, 2, 0, None), (20, 1, 2, 1, None),
    pytest.param(20, 5, 1, 0, {"mode": "lsmr"}, marks=pytest.mark.slow),  # dense: ~1 min per task, see below
])
def test_fast_path_matches_cvxpylayers(n_way, k_shot, tasks, seed, solver_args):
    support, labels, query = episode(tasks, n_way, k_shot, 4, 24, seed)
    w = torch.randn(tasks, 4, n_way, generator=torch.Generator().manual_seed(seed + 100), dtype=torch.float64)
    lf, sf, qf, ok = logits_and_grads(lambda s, y, q: svm_logits(s, y, q, n_way, **TIGHT), support, labels, query, w)
    lc, sc, qc, _ = logits_and_grads(lambda s, y, q: svm_logits_cvxpy(s, y, q, n_way, solver_args=solver_args),
                                     support, labels, query, w)
    assert ok.all()
    assert rel(lf, lc) < 1e-4 and rel(sf, sc) < 1e-4 and rel(qf, qc) < 1e-4, (rel(lf, lc), rel(sf, sc), rel(qf, qc))


@pytest.mark.slow
def test_fast_path_matches_cvxpylayers_dense_20way_5shot():
    support, labels, query = episode(1, 20, 5, 4, 24, 7)
    w = torch.randn(1, 4, 20, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    lf, sf, qf, _ = logits_and_grads(lambda s, y, q: svm_logits(s, y, q, 20, **TIGHT), support, labels, query, w)
    lc, sc, qc, _ = logits_and_grads(lambda s, y, q: svm_logits_cvxpy(s, y, q, 20), support, labels, query, w)
    assert max(rel(lf, lc), rel(sf, sc), rel(qf, qc)) < 1e-4


def test_default_settings_agree_with_cvxpylayers_at_resnet_width():
    """Training defaults (15 steps, default tol, float32 embeddings) at D = 1600."""
    support, labels, query = episode(2, 5, 5, 6, 1600, 3)
    w = torch.randn(2, 6, 5, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    lf, sf, qf, ok = logits_and_grads(lambda s, y, q: svm_logits(s, y, q, 5), support.float(), labels, query.float(), w)
    lc, sc, qc, _ = logits_and_grads(lambda s, y, q: svm_logits_cvxpy(s, y, q, 5), support, labels, query, w)
    assert ok.all() and lf.dtype == torch.float32
    assert max(rel(lf, lc), rel(sf, sc), rel(qf, qc)) < 1e-4


@pytest.mark.parametrize("method,n_way,k_shot,dim", [
    *[(m, *shape) for m in ("active_set", "interior_point") for shape in [(5, 1, 4), (5, 5, 4), (5, 5, 64)]],
    ("active_set", 20, 2, 8),
    # 8 s; the interior point at 20-way stays in CI through test_kkt_conditions_hold and the 5-way comparisons
    pytest.param("interior_point", 20, 2, 8, marks=pytest.mark.slow),
])
def test_both_methods_match_cvxpylayers_on_the_dual(method, n_way, k_shot, dim):
    """Each QP method from the Gram matrix: alpha and dL/dP against cvxpylayers; the bounds bind in every case."""
    support, labels, _ = episode(2, n_way, k_shot, 1, dim, 30 + dim + k_shot)
    P = support_gram(support.relu(), 1.0)
    Y = one_hot(labels, n_way, torch.float64)
    w = torch.randn(Y.shape, generator=torch.Generator().manual_seed(dim), dtype=torch.float64)

    def alpha_and_grad(solve):
        leaf = P.clone().requires_grad_()
        alpha = solve(leaf)
        (alpha * w).sum().backward()
        return alpha.detach(), leaf.grad

    res = solve_qp(P, -Y, 0.1 * Y, torch.zeros_like(Y[..., 0]), method=method, **TIGHT)
    fast = alpha_and_grad(lambda P: solve_qp(P, -Y, 0.1 * Y, torch.zeros_like(Y[..., 0]), method=method, **TIGHT).x)
    ref = alpha_and_grad(lambda P: svm_dual_cvxpy_gram(P, labels, n_way))
    assert res.ok.all() and res.polished.all()
    # active_set: its steps finished every task, the interior point did not run; interior_point: no active-set steps
    assert res.by_active_set.tolist() == [method == "active_set"] * 2
    assert rel(fast[0], ref[0]) < 1e-4 and rel(fast[1], ref[1]) < 1e-4, (rel(fast[0], ref[0]), rel(fast[1], ref[1]))


@pytest.mark.parametrize("n_way,k_shot,dim,steps", [
    (5, 1, 1600, 1), (5, 5, 1600, 1), (5, 1, 8, 12), (5, 5, 8, 12), (20, 1, 8, 12), (20, 5, 8, 12), (20, 5, 64, 12),
])
def test_active_set_steps_alone_solve_svm_duals(n_way, k_shot, dim, steps):
    """Active-set steps alone solve every task within ``steps``; at small D the bounds bind, so it takes more than one.

    At D = 1600 the dual's solution lies inside its box (the embeddings' norm dwarfs 1 / C), so
    the first, bound-free solve is the answer: the common case the default method is fast for."""
    support, labels, _ = episode(16, n_way, k_shot, 1, dim, 40 + dim + n_way + k_shot)
    P = support_gram(support.relu(), 1.0)
    Y = one_hot(labels, n_way, torch.float64)
    res = solve_qp(P, -Y, 0.1 * Y, torch.zeros_like(Y[..., 0]), max_iter=steps, tol=1e-10)
    assert res.by_active_set.all() and res.ok.all(), res.iters
    assert bool((res.iters > 1).any()) == (dim < 1600)


def test_tasks_the_active_set_cycles_on_are_solved_by_the_interior_point():
    """A general QP (not an SVM dual) on which active-set steps cycle among 4 sets: the task is still solved."""
    g = torch.Generator().manual_seed(5)
    A = torch.randn(64, 3, 3, generator=g, dtype=torch.float64)
    P = A @ A.transpose(1, 2) + 0.05 * torch.eye(3, dtype=torch.float64)
    R = torch.randn(64, 3, 3, generator=g, dtype=torch.float64)
    U = torch.rand(64, 3, 3, generator=g, dtype=torch.float64)
    b = (U - 0.5 * torch.rand(64, 3, 3, generator=g, dtype=torch.float64)).sum(-1)
    P, R, U, b = P[32:34], R[32:34], U[32:34], b[32:34]  # task 33 of this draw cycles, task 32 does not
    w = torch.randn(2, 3, 3, generator=g, dtype=torch.float64)

    def solve(method):
        leaves = [t.clone().requires_grad_() for t in (P, R, U, b)]
        res = solve_qp(*leaves, max_iter=30, method=method)
        return res, torch.autograd.grad((res.x * w).sum(), leaves)

    (fast, fast_grads), (robust, robust_grads) = solve("active_set"), solve("interior_point")
    assert fast.ok.all() and fast.polished.all()
    assert fast.by_active_set.tolist() == [True, False]
    assert fast.iters[0] < 30 < fast.iters[1]  # task 33 spent its 30 active-set steps, then the interior point's
    torch.testing.assert_close(fast.x, robust.x, rtol=1e-9, atol=1e-12)
    for a, b_ in zip(fast_grads, robust_grads):  # the fallback's active set reaches the backward
        torch.testing.assert_close(a, b_, rtol=1e-9, atol=1e-12)


def test_gradient_matches_central_finite_differences():
    support, labels, query = episode(1, 3, 2, 5, 4, 11)
    query_y = torch.randint(0, 3, (1, 5), generator=torch.Generator().manual_seed(0))

    def loss(s, q):
        logits, ok = svm_logits(s, labels, q, 3, C=0.5, **TIGHT)
        assert ok.all()
        return F.cross_entropy(logits.flatten(0, 1), query_y.flatten())

    inputs = (support.requires_grad_(), query.requires_grad_())
    assert torch.autograd.gradcheck(loss, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("method", ["active_set", "interior_point"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n_way,k_shot", [(5, 1), (5, 5), (20, 2)])
def test_kkt_conditions_hold(dtype, n_way, k_shot, method):
    support, labels, _ = episode(4, n_way, k_shot, 1, 32, n_way + k_shot, dtype)
    Y = F.one_hot(labels, n_way).to(dtype)
    P = support @ support.transpose(1, 2) + torch.eye(n_way * k_shot, dtype=dtype)
    R, U, b = -Y, 0.1 * Y, torch.zeros_like(Y[..., 0])
    res = solve_qp(P, R, U, b, method=method)
    assert res.ok.all() and res.x.dtype == dtype
    r = kkt_residuals(P, R, U, b, res.x, res.nu, res.lam)
    x_scale, d_scale = res.x.abs().amax(), (P @ res.x).abs().amax()
    tol = 1e-8 if dtype == torch.float64 else 2e-5
    assert (r["equality"] <= tol * x_scale).all() and (r["primal_feasibility"] <= tol * x_scale).all()
    assert (r["stationarity"] <= tol * d_scale).all() and (r["dual_feasibility"] <= tol * d_scale).all()
    assert (r["complementarity"] <= tol * x_scale * d_scale).all()


@pytest.mark.parametrize("method", ["active_set", "interior_point"])
def test_general_qp_gradients_match_finite_differences(method):
    """The solver beyond the SVM: random bounds and row sums; gradients w.r.t. P, R, U and b."""
    g = torch.Generator().manual_seed(5)
    A = torch.randn(2, 4, 4, generator=g, dtype=torch.float64)
    P = A @ A.transpose(1, 2) + torch.eye(4, dtype=torch.float64)
    R = torch.randn(2, 4, 3, generator=g, dtype=torch.float64)
    U = torch.rand(2, 4, 3, generator=g, dtype=torch.float64)
    b = (U - 0.5 * torch.rand(2, 4, 3, generator=g, dtype=torch.float64)).sum(-1)  # feasible: b < U 1
    res = solve_qp(P, R, U, b, method=method, **TIGHT)
    assert res.ok.all() and res.polished.all()
    assert ((res.lam > 1e-6).sum() > 0) and ((res.lam > 1e-6).sum() < res.lam.numel())  # some bounds active

    def x_of(P, R, U, b):
        return solve_qp(0.5 * (P + P.transpose(1, 2)), R, U, b, method=method, **TIGHT).x

    assert torch.autograd.gradcheck(x_of, tuple(t.clone().requires_grad_() for t in (P, R, U, b)), eps=1e-6, atol=1e-6)


def test_batch_equals_loop_over_tasks():
    support, labels, query = episode(4, 5, 2, 3, 16, 21)
    batched, _ = svm_logits(support, labels, query, 5)
    looped = torch.cat([svm_logits(support[i:i + 1], labels[i:i + 1], query[i:i + 1], 5)[0] for i in range(4)])
    torch.testing.assert_close(batched, looped)


def test_per_task_grad_under_vmap_equals_batched_autograd():
    """The head inside ``vmap(grad(task_loss))`` (the algorithms' vmap strategy) gives the batched gradients."""
    support, labels, query = episode(3, 5, 2, 6, 8, 9)
    query_y = torch.randint(0, 5, (3, 6), generator=torch.Generator().manual_seed(1))
    with torch.device("meta"):
        net = MLP(8, [16], 12)
    params = init_params(net, 0, dtype=torch.float64)

    def task_loss(p, sx, sy, qx, qy):
        es, eq = functional_call(net, p, (sx,)), functional_call(net, p, (qx,))
        return F.cross_entropy(svm_logits(es[None], sy[None], eq[None], 5, **TIGHT)[0][0], qy)

    per_task = vmap(grad(task_loss), in_dims=(None, 0, 0, 0, 0))(params, support, labels, query, query_y)
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    embed = vmap(lambda x: functional_call(net, leaves, (x,)))
    logits, _ = svm_logits(embed(support), labels, embed(query), 5, **TIGHT)
    loss = sum(F.cross_entropy(logits[i], query_y[i]) for i in range(3))
    for name, g in zip(leaves, torch.autograd.grad(loss, list(leaves.values()))):
        torch.testing.assert_close(per_task[name].sum(0), g)


@pytest.mark.parametrize("case", ["duplicate_rows", "rank_deficient", "zero_support", "zero_everything"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_degenerate_inputs_stay_finite(case, dtype):
    support, labels, query = episode(3, 5, 5, 6, 32, 8, dtype)
    if case == "duplicate_rows":
        support = support[:, :1].expand_as(support).clone()  # every support image identical
    elif case == "rank_deficient":
        support = support[..., :2] @ torch.randn(2, 32, generator=torch.Generator().manual_seed(0), dtype=dtype)
    elif case == "zero_support":
        support = torch.zeros_like(support)
    else:
        support, query = torch.zeros_like(support), torch.zeros_like(query)
    s, q = support.requires_grad_(), query.requires_grad_()
    logits, ok = svm_logits(s, labels, q, 5)
    F.cross_entropy(logits.flatten(0, 1), torch.zeros(18, dtype=torch.long)).backward()
    assert ok.all()
    assert logits.isfinite().all() and s.grad.isfinite().all() and q.grad.isfinite().all()


def test_broken_and_unconverged_tasks_are_reported_not_nan():
    support, labels, query = episode(3, 5, 1, 4, 8, 2)
    support[1, 0, 0] = float("nan")
    s, q = support.requires_grad_(), query.requires_grad_()
    logits, ok = svm_logits(s, labels, q, 5)
    assert ok.tolist() == [True, False, True]
    logits.sum().backward()
    assert logits.isfinite().all() and s.grad.isfinite().all() and q.grad.isfinite().all()
    assert (s.grad[1] == 0).all() and (s.grad[0] != 0).any()

    clean = query.detach().clone()
    query = clean.clone()
    query[2, 1, 3] = float("inf")  # a broken query: seen in its task's logits, then zeroed
    s, q = support.detach().nan_to_num().requires_grad_(), query.requires_grad_()
    logits, ok = svm_logits(s, labels, q, 5)
    assert ok.tolist() == [True, True, False]
    logits.sum().backward()
    assert logits.isfinite().all() and s.grad.isfinite().all() and q.grad.isfinite().all()
    assert (q.grad[2] == 0).all() and (q.grad[0] != 0).any()

    logits, ok = svm_logits(s.detach(), labels, clean, 5, max_iter=1)
    assert not ok.any() and logits.isfinite().all()


def test_solution_is_a_crammer_singer_dual():
    support, labels, _ = episode(2, 5, 3, 1, 16, 4)
    alpha = svm_dual(support, labels, 5, C=0.1).x
    Y = F.one_hot(labels, 5).double()
    assert torch.allclose(alpha.sum(-1), torch.zeros(2, 15, dtype=torch.float64), atol=1e-12)
    assert (alpha <= 0.1 * Y + 1e-12).all()


def test_bad_inputs_are_named():
    support, labels, query = episode(1, 5, 1, 2, 4, 0)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        svm_logits(support, labels, query, 3)
    with pytest.raises(ValueError, match="C and jitter must be > 0"):
        svm_logits(support, labels, query, 5, C=0.0)
    with pytest.raises(ValueError, match="flatten the backbone output"):
        svm_logits(support[0], labels, query, 5)
    with pytest.raises(ValueError, match="support_labels must be int64"):
        svm_logits(support, labels.int(), query, 5)


@pytest.mark.parametrize("method", ["active_set", "interior_point"])
def test_a_broken_task_is_neither_ok_nor_polished(method):
    P = (2 * torch.eye(3, dtype=torch.float64)).repeat(2, 1, 1)
    P[1, 0, 1] = float("nan")
    R = torch.tensor([-1.0, 0.0], dtype=torch.float64).expand(2, 3, 2)
    U, b = torch.ones(2, 3, 2, dtype=torch.float64), torch.zeros(2, 3, dtype=torch.float64)
    res = solve_qp(P, R, U, b, method=method)
    assert res.ok.tolist() == [True, False] and res.polished.tolist() == [True, False]
    assert res.by_active_set.tolist() == [method == "active_set", False]
    assert res.x.isfinite().all() and (res.x[1] == 0).all()


def test_bad_solver_arguments_are_named():
    P, R = torch.eye(3, dtype=torch.float64).expand(2, 3, 3), -torch.ones(2, 3, 2, dtype=torch.float64)
    U, b = torch.ones(2, 3, 2, dtype=torch.float64), torch.zeros(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="method must be 'active_set' or 'interior_point', got 'newton'"):
        solve_qp(P, R, U, b, method="newton")
    with pytest.raises(ValueError, match="need max_iter >= 1"):
        solve_qp(P, R, U, b, max_iter=0)
    with pytest.raises(ValueError, match=r"b must be \[T, S\]"):
        solve_qp(P, R, U, b[:, :2])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("qp_dtype", [torch.float64, None])
def test_cuda_matches_cpu(qp_dtype):
    support, labels, query = episode(8, 5, 5, 15, 1600, 6, torch.float32)
    w = torch.randn(8, 15, 5, generator=torch.Generator().manual_seed(1))
    head = lambda s, y, q: svm_logits(s, y, q, 5, qp_dtype=qp_dtype)
    lc, sc, qc, okc = logits_and_grads(head, support, labels, query, w)
    lg, sg, qg, okg = logits_and_grads(head, support.cuda(), labels.cuda(), query.cuda(), w.cuda())
    assert okc.all() and okg.all()
    assert max(rel(lg.cpu(), lc), rel(sg.cpu(), sc), rel(qg.cpu(), qc)) < 1e-3
