"""Reference SVM head: the Crammer-Singer dual of ``learners.heads.svm_head`` solved by cvxpylayers.

This is the oracle the fast path (``learners.heads.qp`` + ``learners.heads.svm_head``) is
checked against, and the only module that imports cvxpy. The dual is written as
a DPP problem in the Cholesky factor L of the jittered, symmetrized support Gram
matrix (L L^T = K + jitter I) and the one-hot labels Y:

    minimize    1/2 ||L^T alpha||_F^2 - <Y, alpha>
    subject to  alpha <= C Y,   alpha 1 = 0.

Measured on this project's machine, cvxpylayers' defaults (diffcp's iterative
``lsqr`` derivative after an SCS solve at eps 1e-4) were 10-15% off finite
differences on small gradient entries. The Cholesky parameterization, diffcp's
``dense`` derivative passed per call, and Clarabel run to tight tolerances bring
it to ~1e-6 of the fast path (which matches finite differences to ~1e-10); with
Clarabel, ``lsqr`` was still 1e-3 off at 20-way 5-shot, ``lsmr`` 2e-5. Everything
is float64 (cvxpylayers returns float64 anyway), logits included.

Slow (one conic solve per task, on CPU): use it for tests and benchmarks only.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from cvxpylayers.torch import CvxpyLayer

from learners.heads.svm_head import check_head_inputs

Tensor = torch.Tensor

# Per call, not in the layer constructor (the constructor's solver_args also reach canonicalization).
SOLVER_ARGS = {
    "mode": "dense",
    "solve_method": "Clarabel",
    "tol_gap_abs": 1e-12,
    "tol_gap_rel": 1e-12,
    "tol_feas": 1e-12,
    "tol_ktratio": 1e-10,
    "max_iter": 200,
}


@functools.lru_cache(maxsize=64)
def _layer(n_support: int, n_way: int, C: float) -> CvxpyLayer:
    """The cvxpylayers problem for one (S, N, C); built once (canonicalization takes tens of ms)."""
    # Imported here: cvxpy takes ~1.5 s to import, and every process that lists the algorithms imports this file.
    import cvxpy as cp
    from cvxpylayers.torch import CvxpyLayer

    alpha = cp.Variable((n_support, n_way))
    L = cp.Parameter((n_support, n_support))
    Y = cp.Parameter((n_support, n_way))
    objective = cp.Minimize(0.5 * cp.sum_squares(L.T @ alpha) - cp.sum(cp.multiply(Y, alpha)))
    problem = cp.Problem(objective, [alpha <= C * Y, cp.sum(alpha, axis=1) == 0])
    assert problem.is_dpp(), "the SVM dual must be DPP for cvxpylayers"
    return CvxpyLayer(problem, parameters=[L, Y], variables=[alpha])


def svm_dual_cvxpy_gram(P: Tensor, support_labels: Tensor, n_way: int, C: float = 0.1,
                        solver_args: dict | None = None) -> Tensor:
    """Dual coefficients alpha [T, S, n_way] (float64) from the jittered Gram matrix P = K + jitter I [T, S, S].

    ``solver_args`` update ``SOLVER_ARGS`` for this call, e.g. ``{"mode": "lsmr"}``: the dense
    derivative factors a matrix of side ~3 S N, which takes about a minute per task at
    20-way 5-shot; lsmr agrees with it to ~2e-5 there in a few seconds.
    """
    if not C > 0:
        raise ValueError(f"C must be > 0, got C={C}")
    P = P.to(torch.float64)
    L = torch.linalg.cholesky(0.5 * (P + P.transpose(1, 2)))
    Y = F.one_hot(support_labels, n_way).to(torch.float64)
    args = {**SOLVER_ARGS, **(solver_args or {})}
    if not (torch.is_grad_enabled() and L.requires_grad):
        args.pop("mode", None)  # without a backward, diffcp hands every argument to Clarabel, which rejects "mode"
    (alpha,) = _layer(P.shape[1], n_way, float(C))(L, Y, solver_args=args)
    return alpha


def svm_dual_cvxpy(support: Tensor, support_labels: Tensor, n_way: int, C: float = 0.1, jitter: float = 1.0,
                   solver_args: dict | None = None) -> Tensor:
    """Dual coefficients alpha [T, S, n_way] (float64), differentiable w.r.t. ``support``."""
    if not C > 0 or not jitter > 0:
        raise ValueError(f"C and jitter must be > 0, got C={C}, jitter={jitter}")
    x = support.to(torch.float64)
    K = x @ x.transpose(1, 2)  # plain autograd here, independent of the fast path's Gram
    P = K + jitter * torch.eye(x.shape[1], dtype=torch.float64, device=x.device)
    return svm_dual_cvxpy_gram(P, support_labels, n_way, C, solver_args)


def svm_logits_cvxpy(support: Tensor, support_labels: Tensor, query: Tensor, n_way: int, C: float = 0.1,
                     jitter: float = 1.0, solver_args: dict | None = None) -> Tensor:
    """Query logits [T, Q, n_way] (float64) of the Crammer-Singer SVM fitted on each support set.

    Same problem and arguments as ``learners.heads.svm_head.svm_logits``; raises (from the solver)
    instead of reporting a per-task ``ok`` mask.
    """
    check_head_inputs(support, support_labels, query, n_way)
    alpha = svm_dual_cvxpy(support, support_labels, n_way, C, jitter, solver_args)
    scores = query.to(torch.float64) @ support.to(torch.float64).transpose(1, 2)
    return scores @ alpha
