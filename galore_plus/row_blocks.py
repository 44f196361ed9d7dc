"""Float32 arithmetic on a low-precision matrix a block of rows at a time, through one small float32 buffer.

A bfloat16 weight or gradient of 11008 x 4096 would need a 180 MB float32 copy (allocated, page-faulted
and passed over again for every weight of every step); a block of rows needs :data:`ROW_BLOCK_VALUES`
values (16 MiB), reused from block to block, and from weight to weight by the allocator (glibc's malloc
serves sizes up to 32 MiB from its heap once one such block has been freed), so it is not
page-faulted anew. Smaller blocks would stay in cache but cost more operations, each of which waits
for every OpenMP thread: on a loaded machine that wait dominates (4M values measured best there).
bfloat16 and float16 values convert to float32 exactly, so a block holds the same numbers as the
corresponding rows of a whole float32 copy.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor

ROW_BLOCK_VALUES = 1 << 22


def float32_row_blocks(matrix: Tensor, block_values: int | None = None) -> Iterator[tuple[slice, Tensor]]:
    """(rows, float32 copy of ``matrix[rows]``) for consecutive blocks of rows of a 2-D ``matrix``.

    A block has about ``block_values`` (default :data:`ROW_BLOCK_VALUES`) values and at least one
    row. The copy lives in one buffer that the next block overwrites: use it (or write it back into
    ``matrix[rows]``) before asking for the next block.
    """
    values = ROW_BLOCK_VALUES if block_values is None else block_values
    rows = max(1, values // max(1, matrix.shape[1]))
    buffer = torch.empty(min(rows, matrix.shape[0]), matrix.shape[1], dtype=torch.float32, device=matrix.device)
    for start in range(0, matrix.shape[0], rows):
        block = slice(start, min(start + rows, matrix.shape[0]))
        target = buffer[: block.stop - start]
        target.copy_(matrix[block])
        yield block, target
