"""Norm-scaled full-rank residual (Fira, Chen et al. 2024): group keys ``full_rank_residual`` and ``norm_growth_limit``.

GaLore's update P N (or N Q) drops the part of the gradient outside the subspace. Fira adds it back,
scaled like Adam would scale it. Along the dimension that is not projected (column j on the output
side, row i on the input side) the scaling is the ratio of the Adam direction's norm to the
low-rank gradient's norm over the rank dimension:

    phi_j = ||N[:, j]|| / (||R[:, j]|| + 1e-8)        (output side; input side: rows N[i, :], R[i, :])
    S = phi * (G - alpha P R)                         (input side: G - alpha R Q)
    U = alpha P N + S                                 (input side: alpha N Q + S)

``alpha`` is the group's ``scale``. This is the update of the ``fira`` package's ``FiraAdamW``
(its ``alpha``), whose projector multiplies both back-projections by ``alpha``: at ``alpha < 1`` the
residual S therefore also carries (1 - alpha) phi P R, a norm-scaled copy of the in-subspace
gradient, and enters at full size, not multiplied by ``alpha``. On the main job this convention
beat the two alternatives we measured, alpha (P N + phi (G - P R)) and alpha P N + phi (G - P R),
by about 0.05 nats/byte each (docs/levers.md). With ``scale="auto"`` (see
:mod:`galore_plus.auto_scale`) U is formed at alpha = 1 and then rescaled as a whole.

Norm-growth limiter (``norm_growth_limit`` gamma, default 1.01; ``None`` disables it): with s_t the
norm of S at step t, measured without Adam's bias-correction factor sqrt(1 - b2^t) / (1 - b1^t) (as
Fira measures it, so the warm-up of the bias correction is not mistaken for growth), S is divided by
max(s_t / (s_{t-1} + 1e-8), gamma) / gamma, and the stored s_t is the limited norm. The first step
stores s_1 without limiting. The state is that one float per weight. For a weight sharded by rows
(FSDP2) the norm is the whole weight's: ``norm`` sums the squares over every rank.

How it is computed (no full-size tensor is formed; every full-size pass goes a block of rows of G at a
time through a float32 buffer, :mod:`galore_plus.row_blocks`, so G may be bfloat16):

    c = phi / divisor,  X = alpha (N - c R)   gives   U = c G + P X   (input side: c G + X Q)

because P (c R) = c (P R) when c scales columns (and (c R) Q = c (R Q) when it scales rows). The
limiter's norm ||S|| = ||phi s||, s the per-column (per-row) norms of G - alpha P R, is measured in one
blocked pass before U is applied in another (:func:`galore_plus.update.apply_update`, one ``addcmul_``
and one ``addmm_`` per block). That is three rank-r products per step (R, the residual's P R, P X),
the same as forming U, without its full-size temporaries.

Remaining differences from ``FiraAdamW``, all conventions: it adds eps to sqrt(V) before bias
correction and decays weights after the update, not before. With eps = 0 and no weight decay the
updates are equal at any alpha (``tests/test_full_rank_residual.py``, ``tests/test_levers.py``).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .projectors import Side
from .row_blocks import widened_dtype, widened_row_blocks
from .update import LowRankTerm, factor_rows

NORM_FLOOR = 1e-8

Norm = Callable[[Tensor], Tensor]


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


def channel_norms(
    grad: Tensor, side: Side, factor: Tensor | None = None, low_rank: LowRankTerm | None = None,
    block_values: int | None = None,
) -> Tensor:
    """Norms of the channels of f G + (P X | X Q) (f 1 and no low-rank term when None): per column,
    shape (1, n), for the ``side`` "left", per row, shape (m, 1), for "right".

    G (any dtype) goes a block of rows at a time through a float32 (float64 for float64) buffer; the sum is formed block by
    block, never whole.
    """
    per_column = side == "left"
    squares = torch.zeros((1, grad.shape[1]) if per_column else (grad.shape[0], 1),
                          dtype=widened_dtype(grad.dtype), device=grad.device)
    for rows, block in widened_row_blocks(grad, block_values):
        if factor is not None:
            block.mul_(factor_rows(factor, rows))
        if low_rank is not None:
            block.addmm_(*low_rank.rows(rows))
        if per_column:
            squares.add_(torch.linalg.vector_norm(block, dim=0, keepdim=True).square_())
        else:
            squares[rows] = torch.linalg.vector_norm(block, dim=1, keepdim=True).square_()
    return squares.sqrt_()


def norm_growth_divisor(measured: Tensor, previous_norm: Tensor | None, limit: float | None) -> Tensor | float:
    """max(s_t / (s_{t-1} + 1e-8), gamma) / gamma: dividing by it caps the growth of a norm over the last
    step's at gamma = ``limit``; 1 on the first step (``previous_norm`` None or +inf) or without a limit."""
    if previous_norm is None or limit is None:
        return 1.0
    return (measured / (previous_norm + NORM_FLOOR)).clamp_(min=limit) / limit


def fira_update(
    grad: Tensor, low_rank: Tensor, direction: Tensor, basis: Tensor, side: Side, alpha: float,
    previous_norm: Tensor | None, limit: float | None, bias_factor: float, norm: Norm = torch.linalg.vector_norm,
    block_values: int | None = None,
) -> tuple[Tensor, LowRankTerm, Tensor]:
    """(c, X as a :class:`~galore_plus.update.LowRankTerm`, the norm to store): U = c G + (P X | X Q) is
    the whole update before lr, S limited (module docstring).

    ``previous_norm`` is the stored norm of the last step (None or +inf on the first: no limiting);
    ``bias_factor`` is :func:`adam_bias_factor` of this step; ``norm`` measures a tensor of this
    process's channels over the whole weight (a sum over ranks for a sharded one). Runs on the
    device: no value is read to the host.
    """
    phi = residual_scaling(direction, low_rank, side)
    residual = channel_norms(grad, side, low_rank=LowRankTerm(-alpha * low_rank, basis, side),
                             block_values=block_values)
    measured = norm(phi * residual) / bias_factor
    divisor = norm_growth_divisor(measured, previous_norm, limit)
    factor = phi / divisor
    return factor, LowRankTerm(alpha * (direction - factor * low_rank), basis, side), measured / divisor
