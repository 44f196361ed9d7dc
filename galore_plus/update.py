"""Applying an update to a weight: p <- p (1 - lr wd) - lr scale U, U = P N | N Q (fused) or a full-size U."""

from __future__ import annotations

import torch
from torch import Tensor

from .projectors import Side


def apply_lowrank_update(
    param: Tensor, direction: Tensor, basis: Tensor, side: Side, lr: float, weight_decay: float, scale: float
) -> None:
    """Decay and update ``param`` in place with one fused matrix product (torch.optim.AdamW's order).

    The full-size update U = scale * (P N or N Q) is never stored: ``addmm_`` computes
    ``beta * p + alpha * (a @ b)`` in one BLAS call. Weights that are not float32 are updated in
    a float32 copy and written back in their own dtype.
    """
    a, b = (basis, direction) if side == "left" else (direction, basis)
    beta, alpha = 1.0 - lr * weight_decay, -lr * scale
    if param.dtype == torch.float32:
        param.addmm_(a, b, beta=beta, alpha=alpha)
        return
    param.copy_(param.float().addmm_(a, b, beta=beta, alpha=alpha))


def apply_full_update(param: Tensor, update: Tensor, lr: float, weight_decay: float, scale: float | Tensor) -> None:
    """p <- p (1 - lr wd) - lr scale U for a full-size float32 ``update`` (overwritten); ``scale`` may be a 0-d tensor.

    Weights that are not float32 are updated in a float32 copy and written back in their own dtype.
    """
    step = update.mul_(scale)
    if param.dtype == torch.float32:
        param.mul_(1.0 - lr * weight_decay).sub_(step, alpha=lr)
        return
    param.copy_(param.float().mul_(1.0 - lr * weight_decay).sub_(step, alpha=lr))
