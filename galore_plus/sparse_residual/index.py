"""The index set I of the sparse residual (GaLore+ Algorithm 2), kept in CSR form.

At the end of step k = ``residual_warmup`` the ``ceil(residual_ratio * m * n)`` positions with the
largest |reconstructed first moment| (P M or M Q) are recorded as I, which then stays fixed. It is
stored as ``residual_row_ptr`` (m + 1 offsets) and ``residual_col`` (int16 when n <= 32768, else
int32), so the index costs about 2 bytes per entry; no m x n matrix is ever formed.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..step.shapes import Side

SELECTION_CHUNK_ELEMENTS = 1 << 20


def residual_count(ratio: float, shape: tuple[int, int]) -> int:
    """|I| = ceil(ratio * (m * n)); zero only when ``ratio`` is zero."""
    return math.ceil(ratio * (shape[0] * shape[1]))


def column_dtype(n: int) -> torch.dtype:
    """The dtype of the column indices of I in a weight of n columns: int16 when n <= 32768, else int32."""
    return torch.int16 if n <= 2**15 else torch.int32


def row_offset_dtype(count: int) -> torch.dtype:
    """The dtype of I's CSR row offsets for |I| = ``count``: int32, or int64 from 2^31 entries on."""
    return torch.int32 if count < 2**31 else torch.int64


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
    boundaries = torch.arange(m + 1, device=flat.device)
    row_ptr = torch.searchsorted(rows, boundaries, out_int32=row_offset_dtype(count) == torch.int32)
    return row_ptr, (flat % n).to(column_dtype(n))


def flat_index(row_ptr: Tensor, col: Tensor, n: int) -> Tensor:
    """The int64 row-major position (i * n + j) of every entry of the CSR index set, for this step only."""
    rows = torch.arange(row_ptr.numel() - 1, device=row_ptr.device)
    return torch.repeat_interleave(rows, row_ptr.diff(), output_size=col.numel()).mul_(n).add_(col)
