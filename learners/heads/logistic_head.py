"""Multinomial logistic regression on a support set's embeddings: the task solver of RFS (Tian et al. 2020).

For one task with embeddings x_i, labels y_i in {0..N-1} and regularization C, it solves

    minimize_{W, b}  1/2 |W|²  +  C · sum_i CE(W x_i + b, y_i)

(the intercept b is not penalized), the problem of scikit-learn's ``LogisticRegression(C=C)`` with the lbfgs
solver, which RFS uses with C = 1 on L2-normalized embeddings. It is solved here by L-BFGS with strong Wolfe line
search in float64 to a gradient tolerance far below scikit-learn's default, so the two agree to the solver
tolerance (tested against scikit-learn). The fit is not differentiated through: pre-training only solves it at
test time on frozen embeddings. One task at a time (its iterations branch on the data, so no vmap).

>>> g = torch.Generator().manual_seed(0)
>>> x, y = torch.randn(25, 64, generator=g), torch.arange(5).repeat_interleave(5)
>>> w, b = logistic_fit(x, y, n_way=5)
>>> (x.double() @ w.T + b).argmax(1).eq(y).all().item()
True
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def logistic_fit(x: Tensor, y: Tensor, n_way: int, C: float = 1.0, max_iter: int = 500,
                 tol: float = 1e-9) -> tuple[Tensor, Tensor]:
    """(weight [n_way, D], bias [n_way]) in float64 of the L2-penalized multinomial logistic regression of
    ``y`` [S] on ``x`` [S, D]."""
    if x.dim() != 2 or y.shape != x.shape[:1]:
        raise ValueError(f"x must be [S, D] and y [S], got {tuple(x.shape)} and {tuple(y.shape)}")
    if C <= 0:
        raise ValueError(f"C must be > 0, got {C}")
    x = x.detach().to(torch.float64)
    y = y.detach()
    w = torch.zeros(n_way, x.shape[1], dtype=torch.float64, device=x.device, requires_grad=True)
    b = torch.zeros(n_way, dtype=torch.float64, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, tolerance_grad=tol, tolerance_change=0.0,
                            history_size=50, line_search_fn="strong_wolfe")

    def objective() -> Tensor:
        opt.zero_grad()
        loss = 0.5 * (w * w).sum() + C * F.cross_entropy(x @ w.T + b, y, reduction="sum")
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(objective)
    return w.detach(), b.detach()
