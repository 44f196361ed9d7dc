"""Sparsely coded residuals (GaLore+ Algorithm 2): the update at the index set I (torch reference).

At the end of step k = ``residual_warmup`` (step 1 when k = 0, where the residual then also applies)
the ``ceil(residual_ratio * m * n)`` positions with the largest |reconstructed first moment| (P M or
M Q) are recorded as the index set I, which then stays fixed. For every later step the update at I
is replaced:

* ``"exact"``: exact Adam moments of the full gradient at I (a gather of G), bias-corrected with
  c = the number of residual steps, U_I = scale * (M_I / (1 - b1^c)) / (sqrt(V_I / (1 - b2^c)) + eps);
* ``"paper"``: Algorithm 2 as written; with Ghat = (P R | R Q) at I and dG = G_I - Ghat,
  dM <- b1 dM + (1 - b1) dG, dV <- b2 dV + 2 (1 - b2) Ghat dG, Vrec = ((P*P) V | V (Q*Q)) at I,
  delta = (dM / (1 - b1^t)) / (sqrt(max((Vrec + dV) / (1 - b2^t), 0)) + eps),
  U_I = scale * ((P N | N Q) at I + delta).

I is chosen and stored by :mod:`galore_plus.sparse_residual.index`. No m x n matrix is ever formed: values
at I are gathers of rows of one factor times columns of the other, in chunks.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..step.shapes import Side

RESIDUAL_MODES = ("exact", "paper")

GATHER_CHUNK_ELEMENTS = 1 << 20


def gather_flat(matrix: Tensor, index: Tensor) -> Tensor:
    """``matrix`` at the flat row-major positions ``index``."""
    return matrix.view(-1).index_select(0, index) if matrix.is_contiguous() else matrix.take(index)


def scatter_flat(matrix: Tensor, index: Tensor, values: Tensor) -> None:
    """Write ``values`` into ``matrix`` at the flat row-major positions ``index``."""
    if matrix.is_contiguous():
        matrix.view(-1).index_copy_(0, index, values)
    else:
        matrix.put_(index, values)


def gathered_products(
    factor: Tensor, others: tuple[Tensor, ...], squared: int, index: Tensor, n: int, side: Side,
    chunk_elements: int = GATHER_CHUNK_ELEMENTS,
) -> list[Tensor]:
    """Entries at the flat positions ``index`` of P X for each X in ``others`` (left side) or of X Q (right side).

    ``factor`` is the basis (P of shape (m, r) or Q of shape (r, n)); ``others[squared]`` is
    multiplied with the element-wise square of the basis instead. Both factors are read as rows of
    (.., r) matrices (one transposed copy of a low-rank side), so every gather reads contiguous
    rows. Work is O(|I| r), extra memory one chunk plus the low-rank copies.
    """
    if side == "left":
        basis_rows, other_rows = factor, [x.t().contiguous() for x in others]
    else:
        basis_rows, other_rows = factor.t().contiguous(), list(others)
    chunk = max(1, chunk_elements // basis_rows.shape[1])
    outputs = [torch.empty(index.numel(), device=factor.device) for _ in others]
    for start in range(0, index.numel(), chunk):
        rows, cols = index[start:start + chunk].div(n, rounding_mode="floor"), index[start:start + chunk] % n
        basis_index, other_index = (rows, cols) if side == "left" else (cols, rows)
        basis_part = basis_rows.index_select(0, basis_index)
        for position, (output, other) in enumerate(zip(outputs, other_rows)):
            weight = basis_part.square() if position == squared else basis_part
            output[start:start + chunk] = torch.linalg.vecdot(weight, other.index_select(0, other_index))
    return outputs


def residual_values(
    param: Tensor, grad: Tensor, index: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor,
    basis: Tensor, side: Side, low_rank: Tensor, lowrank_exp_avg_sq: Tensor, direction: Tensor,
    mode: str, step: int, residual_step: int, beta1: float, beta2: float, eps: float,
    lr: float, weight_decay: float, scale: float,
) -> Tensor:
    """Update the residual moments at I in place and return the new float32 weight values at I.

    ``index`` holds the int64 row-major positions of I (:func:`flat_index`). The new values are
    p_I (1 - lr wd) - lr U_I with U_I of the module docstring; ``step`` is t and ``residual_step`` is
    c >= 1. ``exp_avg``/``exp_avg_sq`` hold M_I, V_I ("exact") or dM, dV ("paper").
    """
    return residual_values_at(
        param, gather_flat(grad, index).float(), index, exp_avg, exp_avg_sq, basis, side, low_rank,
        lowrank_exp_avg_sq, direction, mode, step, residual_step, beta1, beta2, eps, lr, weight_decay, scale,
    )


def residual_values_at(
    param: Tensor, grad_at: Tensor, index: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor,
    basis: Tensor, side: Side, low_rank: Tensor, lowrank_exp_avg_sq: Tensor, direction: Tensor,
    mode: str, step: int, residual_step: int, beta1: float, beta2: float, eps: float,
    lr: float, weight_decay: float, scale: float,
) -> Tensor:
    """:func:`residual_values` from the gradient's float32 values at I, ``grad_at`` (written in place),
    instead of the gradient: per-layer accumulation keeps only those (:mod:`galore_plus.step.accumulate`)."""
    weight_at = gather_flat(param, index).float().mul_(1 - lr * weight_decay)
    if mode == "exact":
        exp_avg.lerp_(grad_at, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad_at, grad_at, value=1 - beta2)
        denom = (exp_avg_sq / (1 - beta2**residual_step)).sqrt_().add_(eps)
        return weight_at.addcdiv_(exp_avg, denom, value=-lr * scale / (1 - beta1**residual_step))
    ghat, vrec, lowrank_update = gathered_products(
        basis, (low_rank, lowrank_exp_avg_sq, direction), 1, index, param.shape[1], side
    )
    dgrad = grad_at.sub_(ghat)
    exp_avg.lerp_(dgrad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(ghat, dgrad, value=2 * (1 - beta2))
    denom = vrec.add_(exp_avg_sq).div_(1 - beta2**step).clamp_(min=0).sqrt_().add_(eps)
    weight_at.sub_(lowrank_update, alpha=lr * scale)
    return weight_at.addcdiv_(exp_avg, denom, value=-lr * scale / (1 - beta1**step))
