"""Sparsely coded residuals (GaLore+ Algorithm 2): the index set I and the update at I (torch reference).

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

I is stored compactly in CSR form: ``residual_row_ptr`` (m + 1 offsets) and ``residual_col`` (int16
when n <= 32768, else int32), so the index costs about 2 bytes per entry. No m x n matrix is ever
formed: values at I are gathers of rows of one factor times columns of the other, in chunks.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .projectors import Side

RESIDUAL_MODES = ("exact", "paper")

SELECTION_CHUNK_ELEMENTS = 1 << 20
GATHER_CHUNK_ELEMENTS = 1 << 20


def residual_count(ratio: float, shape: tuple[int, int]) -> int:
    """|I| = ceil(ratio * (m * n)); zero only when ``ratio`` is zero."""
    return math.ceil(ratio * (shape[0] * shape[1]))


def reconstructed_rows(basis: Tensor, low_rank: Tensor, side: Side, start: int, stop: int) -> Tensor:
    """Rows ``start:stop`` of the full-size matrix P L (left side) or L Q (right side)."""
    if side == "left":
        return basis[start:stop] @ low_rank
    return low_rank[start:stop] @ basis


def select_residual_index(
    basis: Tensor, exp_avg: Tensor, side: Side, shape: tuple[int, int], count: int,
    chunk_elements: int = SELECTION_CHUNK_ELEMENTS,
) -> tuple[Tensor, Tensor]:
    """CSR index (row_ptr, col) of the ``count`` largest |P M| or |M Q| entries, sorted by position.

    The reconstruction is formed a block of rows at a time and merged into a running top-``count``,
    so the extra memory is one block of about ``chunk_elements`` values plus O(count). Row offsets
    come from ``searchsorted`` on the sorted rows (no ``bincount``, which reads a size on the host).
    """
    m, n = shape
    rows_per_chunk = max(1, chunk_elements // n)
    best_values = torch.empty(0, device=exp_avg.device)
    best_positions = torch.empty(0, dtype=torch.int64, device=exp_avg.device)
    for start in range(0, m, rows_per_chunk):
        stop = min(m, start + rows_per_chunk)
        block = reconstructed_rows(basis, exp_avg, side, start, stop).abs_().flatten()
        values, positions = block.topk(min(count, block.numel()), sorted=False)
        values = torch.cat([best_values, values])
        positions = torch.cat([best_positions, positions + start * n])
        keep = values.topk(min(count, values.numel()), sorted=False).indices
        best_values, best_positions = values[keep], positions[keep]
    flat = best_positions.sort().values
    rows = flat // n
    col_dtype = torch.int16 if n <= 2**15 else torch.int32
    ptr_dtype = torch.int32 if count < 2**31 else torch.int64
    boundaries = torch.arange(m + 1, device=flat.device)
    row_ptr = torch.searchsorted(rows, boundaries, out_int32=ptr_dtype == torch.int32)
    return row_ptr, (flat % n).to(col_dtype)


def flat_index(row_ptr: Tensor, col: Tensor, n: int) -> Tensor:
    """The int64 row-major position (i * n + j) of every entry of the CSR index set, for this step only."""
    rows = torch.arange(row_ptr.numel() - 1, device=row_ptr.device)
    return torch.repeat_interleave(rows, row_ptr.diff(), output_size=col.numel()).mul_(n).add_(col)


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
    instead of the gradient: per-layer accumulation keeps only those (:mod:`galore_plus.accumulate`)."""
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
