"""APOLLO's update rule (Zhu et al. 2024, arXiv:2412.05270): the raw gradient, scaled by ||N|| / ||R||.

For a projected weight with float32 gradient G (m, n), low-rank gradient R = P^T G or G Q^T
(usually from the ``random`` basis of :mod:`galore_plus.random_basis`) and step t >= 1:

1. M, V: Adam moments of R (:func:`galore_plus.lowrank_adam.update_moments`);
2. N = M / (sqrt(V) + eps): APOLLO puts Adam's bias correction into the step size, not into N;
3. s = ||N|| / (||R|| + 1e-8), either per channel (``scale_type="channel"``: one factor per row
   of G for a right-side basis, per column for a left-side one, i.e. along the dimension the basis
   does not project) or once for the whole tensor (``"tensor"``, APOLLO-Mini);
4. U = s G, limited by Fira's norm-growth limiter: when ||U|| exceeds 1.01 times the previous
   step's (limited) norm, U is scaled down to exactly that; the limited norm is kept for the next
   step (a 0-d float32 tensor, the only state besides the two moments);
5. p <- p (1 - lr wd) - lr sqrt(1 - b2^t) / (1 - b1^t) sqrt(scale) U.

The conventions are those of ``apollo_torch.APOLLOAdamW`` 1.0.3 with its defaults
(``scale_front=False``, ``disable_nl=False``): ``scale`` enters as its square root, after the
limiter, and ``eps`` is added to sqrt(V) before any bias correction. Two differences, both
deliberate: weight decay is applied in ``torch.optim.AdamW``'s order (the old weight is decayed;
``apollo_torch`` decays the already-updated one), and the channel axis follows the projected side,
so ``proj_type="reverse_std"`` works (``apollo_torch`` picks the axis from the shape alone and then
fails to broadcast).

Registered as ``UPDATE_RULES["apollo"]`` (``update_rules.apollo_rule``; group keys ``update_rule="apollo"``,
``scale_type``, ``scale``). Presets: :data:`galore_plus.presets.APOLLO` and ``APOLLO_MINI``.
Everything here stays on the device: no value is read back to the host.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .projectors import Side

SCALE_TYPES = ("channel", "tensor")
NORM_GROWTH_LIMIT = 1.01
NORM_EPS = 1e-8


def apollo_direction(exp_avg: Tensor, exp_avg_sq: Tensor, eps: float) -> Tensor:
    """N = M / (sqrt(V) + eps), from moments already updated with this step's low-rank gradient."""
    return exp_avg / exp_avg_sq.sqrt().add_(eps)


def apollo_step_size(lr: float, step: int, beta1: float, beta2: float) -> float:
    """lr sqrt(1 - b2^t) / (1 - b1^t): Adam's bias corrections, applied to the step size."""
    return lr * math.sqrt(1 - beta2**step) / (1 - beta1**step)


def gradient_scaling(direction: Tensor, low_rank_grad: Tensor, side: Side, scale_type: str) -> Tensor:
    """s = ||N|| / (||R|| + 1e-8): shape (m, 1) or (1, n) per channel, 0-d per tensor.

    A right-side basis keeps G's rows in R (m, r), so channels are rows; a left-side basis keeps
    its columns in R (r, n), so channels are columns.
    """
    if scale_type == "tensor":
        return torch.linalg.vector_norm(direction) / (torch.linalg.vector_norm(low_rank_grad) + NORM_EPS)
    dim = 1 if side == "right" else 0
    return torch.linalg.vector_norm(direction, dim=dim, keepdim=True) / (
        torch.linalg.vector_norm(low_rank_grad, dim=dim, keepdim=True) + NORM_EPS
    )


def limit_norm_growth(update: Tensor, previous_norm: Tensor | None) -> tuple[Tensor, Tensor]:
    """(update scaled so its norm grows by at most 1.01x over ``previous_norm``, its norm after scaling).

    On the first step (``previous_norm`` None) nothing is limited. ``update`` is scaled in place.
    """
    norm = torch.linalg.vector_norm(update)
    if previous_norm is None:
        return update, norm
    limiter = (norm / (previous_norm + NORM_EPS)).clamp_(min=NORM_GROWTH_LIMIT) / NORM_GROWTH_LIMIT
    return update.div_(limiter), norm / limiter


def apollo_update(
    grad: Tensor, low_rank_grad: Tensor, direction: Tensor, side: Side, scale_type: str, scale: float,
    previous_norm: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """(U = sqrt(scale) * limited(s G), the limited norm of s G to keep for the next step).

    ``grad`` is G (m, n) in float32 and is not modified; ``direction`` is :func:`apollo_direction`.
    """
    scaled = grad * gradient_scaling(direction, low_rank_grad, side, scale_type)
    limited, norm = limit_norm_growth(scaled, previous_norm)
    return limited.mul_(math.sqrt(scale)), norm


def apply_dense_update(param: Tensor, update: Tensor, step_size: float, weight_decay_factor: Tensor) -> None:
    """p <- p * weight_decay_factor - step_size * update, in place (float32 arithmetic for any weight dtype)."""
    if param.dtype == torch.float32:
        param.mul_(weight_decay_factor).add_(update, alpha=-step_size)
        return
    param.copy_(param.float().mul_(weight_decay_factor).add_(update, alpha=-step_size))
