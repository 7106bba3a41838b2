"""Ridge-regression head: MetaOptNet-RR (Lee et al. 2019) / R2D2 (Bertinetto et al., ICLR 2019).

Each task fits a linear map from embeddings to one-hot labels by ridge regression
on its support set and applies it to the query set. In closed form,

    W = (X^T X + lam I)^{-1} X^T Y = X^T (X X^T + lam I)^{-1} Y      (Woodbury)

and the head uses the right-hand form: an S x S system (S support points) instead
of a D x D one, so it stays cheap for D = 16000 ResNet-12 embeddings. The logits
are  Q W = Q (X^T alpha)  with  alpha = (K + lam I)^{-1} Y,  K = X X^T.

MetaOptNet-RR writes the same fit as a QP with linear term -2 Y, so its logits
are twice these; R2D2 follows the head with a learnable scale and bias, which
absorbs any such constant. ``lam`` may be a tensor (a scalar, or one per task
[T]) to learn it, as R2D2 does; the default 50.0 is MetaOptNet-RR's.

>>> T, S, Q, D, n_way = 2, 5, 15, 64, 5
>>> g = torch.Generator().manual_seed(0)
>>> support, query = torch.randn(T, S, D, generator=g), torch.randn(T, Q, D, generator=g)
>>> ridge_logits(support, torch.arange(n_way).repeat(T, 1), query, n_way).shape
torch.Size([2, 15, 5])
"""

from __future__ import annotations

import torch

from learners.heads.svm_head import (
    check_head_inputs,
    dual_readout,
    one_hot,
    support_gram,
    traced,
)

Tensor = torch.Tensor


def ridge_dual(support: Tensor, support_labels: Tensor, n_way: int, lam: float | Tensor = 50.0) -> Tensor:
    """alpha = (X X^T + lam I)^{-1} Y, [T, S, n_way]: the ridge fit's dual coefficients.

    The system is symmetrized and solved by Cholesky; a task whose embeddings hold NaN or inf
    gets NaN coefficients (only that task), which the algorithms' finite check drops.
    """
    T, S, _ = support.shape
    lam_t = torch.as_tensor(lam, dtype=support.dtype, device=support.device)
    if lam_t.dim() > 1 or (lam_t.dim() == 1 and lam_t.shape[0] != T):
        raise ValueError(f"lam must be a number, a scalar tensor or one value per task [{T}], "
                         f"got shape {tuple(lam_t.shape)}")
    if not traced(lam_t) and bool((lam_t.detach() <= 0).any()):
        raise ValueError(f"lam must be > 0 (it keeps X X^T + lam I invertible), got {lam}")
    A = support_gram(support, 0.0) + lam_t.reshape(-1, 1, 1) * torch.eye(S, dtype=support.dtype, device=support.device)
    L, _ = torch.linalg.cholesky_ex(A)
    Y = one_hot(support_labels, n_way, support.dtype)
    return torch.cholesky_solve(Y, L)


def ridge_logits(support: Tensor, support_labels: Tensor, query: Tensor, n_way: int,
                 lam: float | Tensor = 50.0) -> Tensor:
    """Query logits [T, Q, n_way] of the ridge regression fitted on each task's support set.

    support [T, S, D], support_labels [T, S] int64 in [0, n_way), query [T, Q, D]; differentiable
    w.r.t. support, query and (if a tensor) lam. Any float dtype and device.
    """
    check_head_inputs(support, support_labels, query, n_way)
    return dual_readout(query, support, ridge_dual(support, support_labels, n_way, lam))
