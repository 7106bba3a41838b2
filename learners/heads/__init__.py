"""Heads written from a support set: the common frame (``support_head``), the SVM (``svm_head`` over the batched
QP solver ``qp``, or cvxpylayers in ``svm_cvxpy``) and ridge regression (``ridge_head``)."""
