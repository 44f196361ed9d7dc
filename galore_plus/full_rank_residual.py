"""Norm-scaled full-rank residual (Fira, Chen et al. 2024): group keys ``full_rank_residual`` and ``norm_growth_limit``.

GaLore's update P N (or N Q) drops the part of the gradient outside the subspace. Fira adds it back,
scaled like Adam would scale it. Along the dimension that is not projected (column j on the output
side, row i on the input side) the scaling is the ratio of the Adam direction's norm to the
low-rank gradient's norm over the rank dimension:

    phi_j = ||N[:, j]|| / (||R[:, j]|| + 1e-8)        (output side; input side: rows N[i, :], R[i, :])
    S = phi * (G - alpha P R)                         (input side: G - alpha R Q)
    U = alpha P N + S                                 (input side: alpha N Q + S)

``alpha`` is the group's ``scale``. This is the update of the ``fira`` package's ``FiraAdamW``
(its ``alpha``), whose projector multiplies both back-projections by ``alpha``: at ``alpha < 1`` the
residual S therefore also carries (1 - alpha) phi P R, a norm-scaled copy of the in-subspace
gradient, and enters at full size, not multiplied by ``alpha``. On the main job this convention
beat the two alternatives we measured, alpha (P N + phi (G - P R)) and alpha P N + phi (G - P R),
by about 0.05 nats/byte each (docs/levers.md). With ``scale="auto"`` (see
:mod:`galore_plus.auto_scale`) U is formed at alpha = 1 and then rescaled as a whole.

Norm-growth limiter (``norm_growth_limit`` gamma, default 1.01; ``None`` disables it): with s_t the
norm of S at step t, measured without Adam's bias-correction factor sqrt(1 - b2^t) / (1 - b1^t) (as
Fira measures it, so the warm-up of the bias correction is not mistaken for growth), S is divided by
max(s_t / (s_{t-1} + 1e-8), gamma) / gamma, and the stored s_t is the limited norm. The first step
stores s_1 without limiting. The state is that one float per weight. For a weight sharded by rows
(FSDP2) the norm is the whole weight's: ``norm`` sums the squares over every rank.

Remaining differences from ``FiraAdamW``, all conventions: it adds eps to sqrt(V) before bias
correction and decays weights after the update, not before. With eps = 0 and no weight decay the
updates are equal at any alpha (``tests/test_full_rank_residual.py``, ``tests/test_levers.py``).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .projectors import Side, project_back

NORM_FLOOR = 1e-8


def adam_bias_factor(step: int, beta1: float, beta2: float) -> float:
    """sqrt(1 - b2^t) / (1 - b1^t): how much Adam's bias correction enlarges M / sqrt(V) at step t."""
    return (1 - beta2**step) ** 0.5 / (1 - beta1**step)


def residual_scaling(direction: Tensor, low_rank: Tensor, side: Side) -> Tensor:
    """phi: ||N|| / (||R|| + 1e-8) over the rank dimension, shaped to broadcast over the full-size gradient.

    Output side (N, R of shape (r, n)): one value per column, shape (1, n).
    Input side (N, R of shape (m, r)): one value per row, shape (m, 1).
    """
    dim = 0 if side == "left" else 1
    direction_norm = torch.linalg.vector_norm(direction, dim=dim, keepdim=True)
    return direction_norm / torch.linalg.vector_norm(low_rank, dim=dim, keepdim=True).add_(NORM_FLOOR)


Norm = Callable[[Tensor], Tensor]


def scaled_residual(grad: Tensor, low_rank: Tensor, direction: Tensor, basis: Tensor, side: Side, alpha: float) -> Tensor:
    """S = phi * (G - alpha * back-projection of R), a new full-size tensor."""
    residual = grad - alpha * project_back(low_rank, basis, side)
    return residual.mul_(residual_scaling(direction, low_rank, side))


def limit_norm_growth(
    term: Tensor, previous_norm: Tensor | None, limit: float | None, bias_factor: float,
    norm: Norm = torch.linalg.vector_norm,
) -> tuple[Tensor, Tensor]:
    """(S limited in place, the norm to store) for the limiter of the module docstring.

    ``previous_norm`` is the stored norm of the last step (None or +inf on the first: no limiting);
    ``bias_factor`` is :func:`adam_bias_factor` of this step; ``norm`` measures the whole term (of
    every rank's rows for a sharded weight). Runs on the device: no value is read to the host.
    """
    measured = norm(term) / bias_factor
    if previous_norm is None or limit is None:
        return term, measured
    divisor = (measured / (previous_norm + NORM_FLOOR)).clamp_(min=limit) / limit
    return term.div_(divisor), measured / divisor


def norm_scaled_update(
    grad: Tensor, low_rank: Tensor, direction: Tensor, basis: Tensor, side: Side, alpha: float,
    previous_norm: Tensor | None, limit: float | None, bias_factor: float, norm: Norm = torch.linalg.vector_norm,
) -> tuple[Tensor, Tensor]:
    """(U = alpha * back-projection of N + limited S, the norm to store): the whole update before lr."""
    term, stored = limit_norm_growth(scaled_residual(grad, low_rank, direction, basis, side, alpha), previous_norm,
                                     limit, bias_factor, norm)
    if side == "left":
        return term.addmm_(basis, direction, alpha=alpha), stored
    return term.addmm_(direction, basis, alpha=alpha), stored
