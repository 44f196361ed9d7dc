"""Float32 arithmetic on a low-precision matrix a block of rows at a time, through one small float32 buffer.

A bfloat16 weight or gradient of 11008 x 4096 would need a 180 MB float32 copy (allocated, page-faulted
and passed over again for every weight of every step); a block of rows needs :data:`ROW_BLOCK_VALUES`
values (16 MiB), reused from block to block, and from weight to weight by the allocator (glibc's malloc
serves sizes up to 32 MiB from its heap once one such block has been freed), so it is not
page-faulted anew. Smaller blocks would stay in cache but cost more operations, each of which waits
for every OpenMP thread: on a loaded machine that wait dominates (4M values measured best there).
bfloat16 and float16 values convert to float32 exactly, so a block holds the same numbers as the
corresponding rows of a whole float32 copy.

A stack of E matrices (E, m, n) (a mixture-of-experts weight) is walked the same way: a block is the
rows ``[..., rows, :]`` of every matrix at once, of about :data:`ROW_BLOCK_VALUES` values in all.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
from torch import Tensor

ROW_BLOCK_VALUES = 1 << 22


def row_slices(shape: tuple[int, ...], block_values: int | None = None) -> list[slice]:
    """Consecutive blocks of rows of an (m, n) matrix, or of the rows of every matrix of an (E, m, n) stack,
    each of about ``block_values`` (default :data:`ROW_BLOCK_VALUES`) values and at least one row. Two
    tensors of the same shape but for m get the same blocks, so their row blocks can be walked side by side."""
    values = ROW_BLOCK_VALUES if block_values is None else block_values
    m, row_values = shape[-2], math.prod(shape[:-2]) * shape[-1]
    rows = max(1, values // max(1, row_values))
    return [slice(start, min(start + rows, m)) for start in range(0, m, rows)]


def widened_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype arithmetic on a matrix of ``dtype`` is done in: float32, or float64 for a float64 matrix."""
    return torch.promote_types(dtype, torch.float32)


def widened_row_blocks(matrix: Tensor, block_values: int | None = None) -> Iterator[tuple[slice, Tensor]]:
    """(rows, copy of ``matrix[..., rows, :]`` in :func:`widened_dtype`) for the blocks of :func:`row_slices`, of a
    2-D ``matrix`` (or an (E, m, n) stack) of any dtype.

    The copy lives in one buffer that the next block overwrites: use it (or write it back into
    ``matrix[rows]``) before asking for the next block. It is a copy even for a float32 ``matrix``,
    so it may be changed in place.
    """
    blocks = row_slices(tuple(matrix.shape), block_values)
    if not blocks:
        return
    buffer = torch.empty(*matrix.shape[:-2], blocks[0].stop, matrix.shape[-1], dtype=widened_dtype(matrix.dtype),
                         device=matrix.device)
    for block in blocks:
        target = buffer[..., : block.stop - block.start, :]
        target.copy_(matrix[..., block, :])
        yield block, target


def channel_square_sums(matrix: Tensor, per_column: bool, block_values: int | None = None) -> Tensor:
    """Sums of squares of a 2-D ``matrix`` (any dtype) per column, shape (1, n), or per row, shape (m, 1), in float64;
    of each matrix of an (E, m, n) stack: (E, 1, n) or (E, m, 1).

    A block of rows at a time (:func:`widened_row_blocks`): each block's sums are float32 (float64 for a
    float64 matrix), added up in float64, so a column's sum over many rows keeps about float32's
    relative precision, enough for the differences of :mod:`galore_plus.full_rank_residual`.
    """
    *batch, m, n = matrix.shape
    sums = torch.zeros((*batch, 1, n) if per_column else (*batch, m, 1), dtype=torch.float64, device=matrix.device)
    for rows, block in widened_row_blocks(matrix, block_values):
        squares = block.square_()
        if per_column:
            sums.add_(squares.sum(-2, keepdim=True))
        else:
            sums[..., rows, :] = squares.sum(-1, keepdim=True)
    return sums
