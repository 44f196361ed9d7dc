"""Applying an update to a weight, a block of rows at a time: p <- p d - step_size (f G + P X | f G + X Q).

Every update rule writes the weight through :func:`apply_update`, with one or both of two terms:

* :class:`LowRankTerm`, the back-projection P X (left side) or X Q (right side) of a low-rank
  matrix X: GaLore's P N;
* :class:`ScaledGradient`, the gradient G times a factor f that is a 0-d tensor, one value per
  row (m, 1) or one per column (1, n): APOLLO's update;
* both: Fira's update with the full-rank residual (:mod:`galore_plus.rules.fira`).

No full-size update is formed: each block of rows of the weight (the rows themselves of a float32
weight, else a float32 copy, :mod:`galore_plus.step.row_blocks`) gets its rows of f G (from a float32
copy of those rows of G, in any dtype; float64 stays float64) with one ``addcmul_`` and its rows
of P X | X Q with one ``addmm_``. On CUDA, :func:`galore_plus.kernels.dispatch.apply_update` runs instead a
Triton kernel that does the whole update in one pass over the weight and the gradient
(:mod:`galore_plus.kernels.weight_update`); this function is its reference.

A stack of E matrices (E, m, n) is updated the same way, in the blocks of
:func:`~galore_plus.step.row_blocks.row_slices` (rows of one expert with ``addmm_``, or several whole
experts with ``baddbmm_``); f and the skip mask are then one value per expert, (E, 1, 1), or per
channel of each expert, (E, m, 1) or (E, 1, n).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor

from .row_blocks import Block, experts_of, row_slices, widened_dtype, widened_row_blocks
from .shapes import Side
from .stacks import add_product_


@dataclass(frozen=True)
class LowRankTerm:
    """P X (``side`` "left": basis P (m, r), X (r, n)) or X Q ("right": X (m, r), basis Q (r, n))."""

    low_rank: Tensor
    basis: Tensor
    side: Side

    def rows(self, block: Block) -> tuple[Tensor, Tensor]:
        """(a, b) with a @ b the block ``block`` (rows, or a block of a stack) of the back-projection."""
        if self.side == "left":
            return self.basis[block], self.low_rank[experts_of(block)]
        return self.low_rank[block], self.basis[experts_of(block)]


@dataclass(frozen=True)
class ScaledGradient:
    """f G: the gradient ``grad`` (m, n) of any dtype times ``factor``, 0-d, (m, 1) or (1, n)."""

    grad: Tensor
    factor: Tensor


def factor_rows(factor: Tensor, block: Block) -> Tensor:
    """The part of a factor f (0-d, (m, 1) or (1, n); for a stack (E, 1, 1), (E, m, 1) or (E, 1, n)) that
    multiplies the block ``block`` (rows of an (m, n) matrix, or a block of a stack)."""
    if factor.dim() == 0:
        return factor
    return factor[block] if factor.shape[-2] != 1 else factor[experts_of(block)]


def decayed_rows(param: Tensor, factor: Tensor | None, block_values: int | None) -> Iterator[tuple[Block, Tensor]]:
    """(block, float32 target) of ``param``, already multiplied by ``factor``; the caller adds its update to the target.

    The blocks are :func:`~galore_plus.step.row_blocks.row_slices`. A float32 (or float64) ``param``'s target is
    the view ``param[rows]``; a half-precision one goes through one float32 buffer (about ``block_values`` values),
    written back in the weight's dtype once the caller has updated it, so no float32 copy of the whole
    weight is made.
    """
    buffered = widened_dtype(param.dtype) != param.dtype
    if buffered:
        blocks = widened_row_blocks(param, block_values)
    else:
        blocks = ((block, param[block]) for block in row_slices(tuple(param.shape), block_values))
    for block, target in blocks:
        if factor is not None:
            target.mul_(factor_rows(factor, block))
        yield block, target
        if buffered:
            param[block].copy_(target)


def apply_update(
    param: Tensor, step_size: float, decay: float, finite: Tensor, low_rank: LowRankTerm | None = None,
    gradient: ScaledGradient | None = None, block_values: int | None = None,
) -> None:
    """p <- p * decay - step_size * (f G + P X | f G + X Q) in place; p unchanged where ``finite`` is False.

    ``decay`` is 1 - lr wd (torch.optim.AdamW's order: the old weight is decayed). ``finite`` is a 0-d
    bool tensor on the weight's device; where it is False, X and f are replaced by zeros and G's
    non-finite entries by 0 (``nan_to_num`` on a block in cache: the identity on a finite G), and the
    decay by 1, all on the device, so nothing is read on the host and exactly zero is added.
    """
    decay_factor = torch.where(finite, decay, 1.0) if decay != 1.0 else None
    if low_rank is not None:
        low_rank = LowRankTerm(torch.where(finite, low_rank.low_rank, 0.0), low_rank.basis, low_rank.side)
    grad_blocks = None
    if gradient is not None:
        gradient = ScaledGradient(gradient.grad, torch.where(finite, gradient.factor, 0.0))
        grad_blocks = widened_row_blocks(gradient.grad, block_values)
    for rows, target in decayed_rows(param, decay_factor, block_values):
        if gradient is not None:
            grad_rows, block = next(grad_blocks)
            assert grad_rows == rows, "the weight and its gradient have the same shape, hence the same row blocks"
            block.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
            target.addcmul_(block, factor_rows(gradient.factor, rows), value=-step_size)
        if low_rank is not None:
            a, b = low_rank.rows(rows)
            add_product_(target, a.to(target.dtype), b.to(target.dtype), alpha=-step_size)   # float64 weight: float32 terms
