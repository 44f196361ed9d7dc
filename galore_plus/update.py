"""Applying an update to a weight: p <- p (1 - lr wd) - lr scale U, U = P N | N Q (fused) or a full-size U."""

from __future__ import annotations

import torch
from torch import Tensor

from .projectors import Side


ROW_CHUNK_VALUES = 1 << 20  # values of a non-float32 weight updated at once through a float32 buffer (4 MiB)


def apply_lowrank_update(
    param: Tensor, direction: Tensor, basis: Tensor, side: Side, lr: float, weight_decay: float, scale: float,
    finite: Tensor, chunk_values: int | None = None,
) -> None:
    """Decay and update ``param`` in place (torch.optim.AdamW's order); unchanged where ``finite`` is False.

    The full-size update U = scale * (P N or N Q) is never stored: ``addmm_`` computes
    ``p + alpha * (a @ b)`` in one BLAS call. ``finite`` is a 0-d bool tensor on the
    weight's device and ``direction`` is zero where it is False; the weight decay factor is then
    masked on the device (one extra elementwise pass, only when ``weight_decay`` is non-zero), so
    nothing is read on the host. A weight that is not float32 is updated a block of rows at a time
    (about ``chunk_values`` values, default :data:`ROW_CHUNK_VALUES`): the rows are copied into a
    small float32 buffer, decayed and updated there, and written back in the weight's dtype, so no
    float32 copy of the whole weight is made. Row i of U is row i of ``a`` times ``b`` on both sides.
    """
    a, b = (basis, direction) if side == "left" else (direction, basis)
    decay, alpha = 1.0 - lr * weight_decay, -lr * scale
    factor = torch.where(finite, decay, 1.0) if decay != 1.0 else None
    if param.dtype == torch.float32:
        if factor is not None:
            param.mul_(factor)
        param.addmm_(a, b, alpha=alpha)
        return
    rows = max(1, (ROW_CHUNK_VALUES if chunk_values is None else chunk_values) // max(1, param.shape[1]))
    buffer = torch.empty(min(rows, param.shape[0]), param.shape[1], dtype=torch.float32, device=param.device)
    for start in range(0, param.shape[0], rows):
        part = param[start:start + rows]
        target = buffer[: part.shape[0]]
        target.copy_(part)
        if factor is not None:
            target.mul_(factor)
        target.addmm_(a[start:start + rows], b, alpha=alpha)
        part.copy_(target)


def apply_full_update(
    param: Tensor, update: Tensor, lr: float, weight_decay: float, scale: float | Tensor, finite: Tensor
) -> None:
    """p <- p (1 - lr wd) - lr scale U for a full-size float32 ``update``; unchanged where ``finite`` is False.

    ``scale`` may be a 0-d tensor. ``update`` is overwritten; where ``finite`` is False it may hold
    NaN/Inf and is replaced by zeros on the device (nothing is read on the host). Weights that are not
    float32 are updated in a float32 copy and written back in their own dtype.
    """
    step = torch.where(finite, update.mul_(scale), 0.0)
    target = param if param.dtype == torch.float32 else param.float()
    if weight_decay != 0.0:
        target.mul_(torch.where(finite, 1.0 - lr * weight_decay, 1.0))
    target.sub_(step, alpha=lr)
    if target is not param:
        param.copy_(target)
