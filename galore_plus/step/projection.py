"""The low-rank gradient of a gradient on a basis, and the back-projection of a low-rank matrix."""

from __future__ import annotations

import torch
from torch import Tensor

from .row_blocks import experts_of, widened_dtype, widened_row_blocks
from .shapes import Side
from .stacks import add_product_


def project(grad: Tensor, basis: Tensor, side: Side, block_values: int | None = None) -> Tensor:
    """Low-rank gradient: P^T G for the left side, G Q^T for the right side.

    A half-precision (bfloat16, float16) gradient is converted to float32 a block of rows at a time
    (:func:`~galore_plus.step.row_blocks.widened_row_blocks`, about ``block_values`` values), never as a
    whole, and multiplied with the float32 basis: right side, the rows of G Q^T of those rows; left
    side, P^T G summed over blocks of rows of G and P (contiguous rows of G, not strided columns).
    A stack G (E, m, n) with bases (E, m, r) | (E, r, n) gives (E, r, n) | (E, m, r), in the blocks of
    :func:`~galore_plus.step.row_blocks.row_slices` (rows of one expert, or several whole experts at once).
    """
    if widened_dtype(grad.dtype) == grad.dtype:
        return basis.mT @ grad if side == "left" else grad @ basis.mT
    *batch, m, n = grad.shape
    if side == "left":
        low_rank = torch.zeros(*batch, basis.shape[-1], n, dtype=torch.float32, device=grad.device)
        for block, values in widened_row_blocks(grad, block_values):
            add_product_(low_rank[experts_of(block)], basis[block].mT, values)
        return low_rank
    low_rank = torch.empty(*batch, m, basis.shape[-2], dtype=torch.float32, device=grad.device)
    for block, values in widened_row_blocks(grad, block_values):
        product = torch.mm if values.dim() == 2 else torch.bmm
        product(values, basis[experts_of(block)].mT, out=low_rank[block])
    return low_rank


def project_back(low_rank: Tensor, basis: Tensor, side: Side) -> Tensor:
    """Full-size matrix (or stack) of a low-rank one: P N for the left side, N Q for the right side."""
    return basis @ low_rank if side == "left" else low_rank @ basis
