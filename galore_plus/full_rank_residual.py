"""Norm-scaled full-rank residual (Fira, Chen et al. 2024): group keys ``full_rank_residual`` and ``norm_growth_limit``.

GaLore's update P N (or N Q) drops the part of the gradient outside the subspace, G - P R (or
G - R Q). Fira adds that part back, scaled like Adam would scale it. Along the dimension that is
not projected (column j on the output side, row i on the input side) the scaling is the ratio of
the Adam direction's norm to the low-rank gradient's norm over the rank dimension:

    phi_j = ||N[:, j]|| / (||R[:, j]|| + 1e-8)        (output side; input side: rows N[i, :], R[i, :])
    S = phi * (G - P R)                               (input side: G - R Q)
    U = P N + S                                       (before ``scale``, which multiplies all of U)

Norm-growth limiter (``norm_growth_limit`` gamma, default 1.01; ``None`` disables it): with s_t the
norm of S at step t, measured without Adam's bias-correction factor sqrt(1 - b2^t) / (1 - b1^t) (as
Fira measures it, so the warm-up of the bias correction is not mistaken for growth), S is divided by
max(s_t / (s_{t-1} + 1e-8), gamma) / gamma, and the stored s_t is the limited norm. The first step
stores s_1 without limiting. The state is that one float per weight.

Differences from the ``fira`` package's code (``FiraAdamW``), all conventions: its ``alpha``
multiplies P N and also the P R subtracted in the residual, where ``scale`` here multiplies the
whole update and the residual is always G - P R (the two agree at alpha = scale = 1); it adds eps
to sqrt(V) before bias correction; it decays weights after the update, not before. With alpha =
scale = 1, eps = 0 and no weight decay the updates are equal (``tests/test_full_rank_residual.py``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .projectors import Side, project_back

NORM_FLOOR = 1e-8


def adam_bias_factor(step: int, beta1: float, beta2: float) -> float:
    """sqrt(1 - b2^t) / (1 - b1^t): how much Adam's bias correction enlarges M / sqrt(V) at step t."""
    return (1 - beta2**step) ** 0.5 / (1 - beta1**step)


def residual_scaling(direction: Tensor, low_rank: Tensor, side: Side) -> Tensor:
    """phi: ||N|| / (||R|| + 1e-8) over the rank dimension, shaped to broadcast over the full-size gradient.

    Output side (N, R of shape (r, n)): one value per column, shape (1, n).
    Input side (N, R of shape (m, r)): one value per row, shape (m, 1).
    """
    dim = 0 if side == "left" else 1
    direction_norm = torch.linalg.vector_norm(direction, dim=dim, keepdim=True)
    return direction_norm / torch.linalg.vector_norm(low_rank, dim=dim, keepdim=True).add_(NORM_FLOOR)


def scaled_residual(grad: Tensor, low_rank: Tensor, direction: Tensor, basis: Tensor, side: Side) -> Tensor:
    """S = phi * (G - back-projection of R), a new full-size tensor."""
    residual = grad - project_back(low_rank, basis, side)
    return residual.mul_(residual_scaling(direction, low_rank, side))


def limit_norm_growth(
    term: Tensor, previous_norm: Tensor | None, limit: float | None, bias_factor: float
) -> tuple[Tensor, Tensor]:
    """(S limited in place, the norm to store) for the limiter of the module docstring.

    ``previous_norm`` is the stored norm of the last step (None or +inf on the first: no limiting);
    ``bias_factor`` is :func:`adam_bias_factor` of this step. Runs on the device: no value is read
    to the host.
    """
    norm = torch.linalg.vector_norm(term) / bias_factor
    if previous_norm is None or limit is None:
        return term, norm
    divisor = (norm / (previous_norm + NORM_FLOOR)).clamp_(min=limit) / limit
    return term.div_(divisor), norm / divisor


def norm_scaled_update(
    grad: Tensor, low_rank: Tensor, direction: Tensor, basis: Tensor, side: Side,
    previous_norm: Tensor | None, limit: float | None, bias_factor: float,
) -> tuple[Tensor, Tensor]:
    """(U = back-projection of N + limited S, the norm to store): the whole update before ``scale`` and lr."""
    term, norm = limit_norm_growth(scaled_residual(grad, low_rank, direction, basis, side), previous_norm, limit, bias_factor)
    if side == "left":
        return term.addmm_(basis, direction), norm
    return term.addmm_(direction, basis), norm
