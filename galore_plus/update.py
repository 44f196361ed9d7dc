"""Applying an update to a weight: p <- p (1 - lr wd) - lr scale U, U = P N | N Q (fused) or a full-size U."""

from __future__ import annotations

import torch
from torch import Tensor

from .projectors import Side


def apply_lowrank_update(
    param: Tensor, direction: Tensor, basis: Tensor, side: Side, lr: float, weight_decay: float, scale: float,
    finite: Tensor,
) -> None:
    """Decay and update ``param`` in place (torch.optim.AdamW's order); unchanged where ``finite`` is False.

    The full-size update U = scale * (P N or N Q) is never stored: ``addmm_`` computes
    ``beta * p + alpha * (a @ b)`` in one BLAS call. ``finite`` is a 0-d bool tensor on the
    weight's device; where it is False ``direction`` (which may then hold NaN/Inf) is replaced by
    zeros and the weight decay factor is masked (one extra elementwise pass, only when
    ``weight_decay`` is non-zero), on the device, so nothing is read on the host. Weights that are
    not float32 are updated in a float32 copy and written back in their own dtype.
    """
    direction = torch.where(finite, direction, 0.0)
    a, b = (basis, direction) if side == "left" else (direction, basis)
    decay, alpha = 1.0 - lr * weight_decay, -lr * scale
    target = param if param.dtype == torch.float32 else param.float()
    if decay != 1.0:
        target.mul_(torch.where(finite, decay, 1.0))
    target.addmm_(a, b, alpha=alpha)
    if target is not param:
        param.copy_(target)


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
