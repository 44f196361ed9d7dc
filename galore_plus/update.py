"""Applying an update to a weight: p <- p (1 - lr wd) - lr scale U, U = P N | N Q (fused) or a full-size U."""

from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor

from .projectors import Side
from .row_blocks import float32_row_blocks


def decay_factor(lr: float, weight_decay: float, finite: Tensor) -> Tensor | None:
    """1 - lr wd as a 0-d tensor that is 1 where ``finite`` is False, or None when there is no decay."""
    return torch.where(finite, 1.0 - lr * weight_decay, 1.0) if weight_decay != 0.0 else None


def decayed_rows(param: Tensor, factor: Tensor | None, block_values: int | None) -> Iterator[tuple[slice, Tensor]]:
    """(rows, float32 target) of ``param``, already multiplied by ``factor``; the caller adds its update to the target.

    A float32 ``param`` is its own single target. Any other dtype goes a block of rows at a time through a
    small float32 buffer (:func:`~galore_plus.row_blocks.float32_row_blocks`, about ``block_values`` values),
    written back in the weight's dtype once the caller has updated it, so no float32 copy of the whole
    weight is made.
    """
    blocks = [(slice(None), param)] if param.dtype == torch.float32 else float32_row_blocks(param, block_values)
    for rows, target in blocks:
        if factor is not None:
            target.mul_(factor)
        yield rows, target
        if target is not param:
            param[rows].copy_(target)


def apply_lowrank_update(
    param: Tensor, direction: Tensor, basis: Tensor, side: Side, lr: float, weight_decay: float, scale: float,
    finite: Tensor, block_values: int | None = None,
) -> None:
    """Decay and update ``param`` in place (torch.optim.AdamW's order); unchanged where ``finite`` is False.

    The full-size update U = scale * (P N or N Q) is never stored: ``addmm_`` computes
    ``p + alpha * (a @ b)`` in one BLAS call. ``finite`` is a 0-d bool tensor on the
    weight's device; where it is False ``direction`` (which may then hold NaN/Inf) is replaced by
    zeros and the weight decay factor is masked (one extra elementwise pass, only when
    ``weight_decay`` is non-zero), on the device, so nothing is read on the host. A weight that is
    not float32 is updated a block of rows at a time (:func:`decayed_rows`): rows of U are rows of
    ``a`` times ``b`` on both sides.
    """
    direction = torch.where(finite, direction, 0.0)
    a, b = (basis, direction) if side == "left" else (direction, basis)
    for rows, target in decayed_rows(param, decay_factor(lr, weight_decay, finite), block_values):
        target.addmm_(a[rows], b, alpha=-lr * scale)


def apply_full_update(
    param: Tensor, update: Tensor, lr: float, weight_decay: float, scale: float | Tensor, finite: Tensor,
    block_values: int | None = None,
) -> None:
    """p <- p (1 - lr wd) - lr scale U for a full-size float32 ``update``; unchanged where ``finite`` is False.

    ``scale`` may be a 0-d tensor. ``update`` is overwritten; where ``finite`` is False it may hold
    NaN/Inf and is replaced by zeros on the device (nothing is read on the host). A weight that is not
    float32 is updated a block of rows at a time (:func:`decayed_rows`) and written back in its own dtype.
    """
    update.mul_(scale)
    for rows, target in decayed_rows(param, decay_factor(lr, weight_decay, finite), block_values):
        target.sub_(torch.where(finite, update[rows], 0.0), alpha=lr)
