"""Float32 arithmetic on a low-precision matrix a block of rows at a time, through one small float32 buffer.

A bfloat16 weight or gradient of 11008 x 4096 would need a 180 MB float32 copy (allocated, page-faulted
and passed over again for every weight of every step); a block of rows needs :data:`ROW_BLOCK_VALUES`
values (16 MiB), reused from block to block, and from weight to weight by the allocator (glibc's malloc
serves sizes up to 32 MiB from its heap once one such block has been freed), so it is not
page-faulted anew. Smaller blocks would stay in cache but cost more operations, each of which waits
for every OpenMP thread: on a loaded machine that wait dominates (4M values measured best there).
bfloat16 and float16 values convert to float32 exactly, so a block holds the same numbers as the
corresponding rows of a whole float32 copy.

A stack of E matrices (E, m, n) (a mixture-of-experts weight) is walked in blocks of about as many
values: a block of rows of one expert (index ``(e, rows)``, a 2-D view) when an expert holds more
values than a block, else several whole experts (index ``(experts, slice(None))``, a 3-D view). The
blocks of a matrix are its row slices, as before. :func:`experts_of` gives the index of a block's
experts, which picks their part of a tensor with one matrix per expert (a basis, a low-rank moment).
"""

from __future__ import annotations

from typing import Iterator, Union

import torch
from torch import Tensor

ROW_BLOCK_VALUES = 1 << 22

Block = Union[slice, tuple[Union[int, slice], slice]]


def row_slices(shape: tuple[int, ...], block_values: int | None = None) -> list[Block]:
    """Consecutive blocks of an (m, n) matrix (row slices) or of an (E, m, n) stack (module docstring), each of
    about ``block_values`` (default :data:`ROW_BLOCK_VALUES`) values and at least one row. Two tensors of the
    same shape but for n get the same blocks, so their blocks can be walked side by side (and a block of a
    matrix indexes both the weight and its gradient: ``tensor[block]``)."""
    values = ROW_BLOCK_VALUES if block_values is None else block_values
    m, n = shape[-2:]
    rows = max(1, values // max(1, n))
    slices = [slice(start, min(start + rows, m)) for start in range(0, m, rows)]
    if len(shape) == 2:
        return slices
    experts = shape[0]
    if len(slices) > 1:
        return [(expert, block) for expert in range(experts) for block in slices]
    together = max(1, values // max(1, m * n))
    return [(slice(start, min(start + together, experts)), slice(None)) for start in range(0, experts, together)]


def experts_of(block: Block) -> tuple:
    """The index of a block's experts in a tensor with one matrix per expert: () for a matrix's block."""
    return () if isinstance(block, slice) else (block[0],)


def widened_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype arithmetic on a matrix of ``dtype`` is done in: float32, or float64 for a float64 matrix."""
    return torch.promote_types(dtype, torch.float32)


def widened_row_blocks(matrix: Tensor, block_values: int | None = None) -> Iterator[tuple[Block, Tensor]]:
    """(block, copy of ``matrix[block]`` in :func:`widened_dtype`) for the blocks of :func:`row_slices`, of a
    2-D ``matrix`` (or an (E, m, n) stack) of any dtype.

    The copy lives in one buffer that the next block overwrites: use it (or write it back into
    ``matrix[block]``) before asking for the next block. It is a copy even for a float32 ``matrix``,
    so it may be changed in place.
    """
    blocks = row_slices(tuple(matrix.shape), block_values)
    if not blocks:
        return
    buffer = torch.empty(matrix[blocks[0]].numel(), dtype=widened_dtype(matrix.dtype), device=matrix.device)
    for block in blocks:
        source = matrix[block]
        target = buffer[: source.numel()].view(source.shape)
        target.copy_(source)
        yield block, target


def channel_square_sums(matrix: Tensor, per_column: bool, block_values: int | None = None) -> Tensor:
    """Sums of squares of a 2-D ``matrix`` (any dtype) per column, shape (1, n), or per row, shape (m, 1), in float64;
    of each matrix of an (E, m, n) stack: (E, 1, n) or (E, m, 1).

    A block of rows at a time (:func:`widened_row_blocks`): each block's sums are float32 (float64 for a
    float64 matrix), added up in float64, so a column's sum over many rows keeps about float32's
    relative precision, enough for the differences of :mod:`galore_plus.rules.fira`.
    """
    *batch, m, n = matrix.shape
    sums = torch.zeros((*batch, 1, n) if per_column else (*batch, m, 1), dtype=torch.float64, device=matrix.device)
    for block, values in widened_row_blocks(matrix, block_values):
        squares = values.square_()
        if per_column:
            sums[experts_of(block)].add_(squares.sum(-2, keepdim=True))
        else:
            sums[block] = squares.sum(-1, keepdim=True)
    return sums
