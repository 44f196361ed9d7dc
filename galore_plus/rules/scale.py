"""The ``"scale"`` update rule: SCALE's column-normalised step (Glentis et al. 2025, arXiv:2506.16659) with its
momentum kept in the subspace.

SCALE steps every weight matrix by theta <- theta - eta C(m_t), C(M)_{:, j} = M_{:, j} / ||M_{:, j}||: each column
(the vector along the output dimension, one per input feature) of the direction divided by its Euclidean norm;
m_t = b m_{t-1} + (1 - b) g_t on the output layer, m_t = g_t (no state) elsewhere. For a weight with gradient
G (m, n) (rows are outputs; a ``transposed`` group's weight is seen as its transpose), basis P (m, r) | Q (r, n),
R = P^T G | G Q^T and step t, this rule is

1. momentum of R only, M <- b1 M + (1 - b1) R (``exp_avg``; ``betas[0]`` is b1), bias-corrected:
   N = M / (1 - b1^t);
2. D = P N + (G - P R) | N Q + (G - R Q): the momentum inside the subspace, the gradient itself outside it
   (SCALE's hidden layers take the raw gradient);
3. U = C(D), each column of D divided by its norm (computed in float64, so a gradient of 1e21 does not
   overflow; a zero column stays zero);
4. p <- p (1 - lr wd) - lr scale 0.2 sqrt(m) U: a column-normalised (m, n) matrix has RMS 1 / sqrt(m), so this
   is the RMS of AdamW's update at ``scale=1`` (the convention of the ``"muon"`` rule; SCALE's own learning
   rates are not AdamW's).

With a full-rank basis D is N Q = the bias-corrected momentum of G, and C(D) = C(m_t) (C ignores a column's
scale): SCALE's output-layer step; with b1 = 0 it is C(G), SCALE's hidden-layer step. At rank r it keeps the r (m
or n) values of M (``exp_avg_sq`` is not read; it stays zero). D and U are full-size float32 temporaries (float64
for a float64 weight).

Refused: FSDP2 row shards (the column norms need every row; raised at the step), per-layer accumulation (no
gradient at the boundary), ``scale="auto"``, the full-rank and sparse residuals (keys it does not read). Works for
8-bit moments, stacks of matrices and per-layer steps without accumulation.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..kernels.dispatch import apply_update
from ..step.apply import ScaledGradient
from .base import UpdateInputs, UpdateRule, require_whole_weight
from .frugal import FULL_GRADIENT_REFUSAL, check_finite_scale, outside_subspace
from .muon import rms_matching_ratio


def scale_momentum_direction(low_rank: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: int, beta1: float,
                             beta2: float, eps: float) -> Tensor:
    """Step 1: updates the momentum M in place with R and returns N = M / (1 - b1^t)."""
    exp_avg.lerp_(low_rank, 1.0 - beta1)
    return exp_avg / (1.0 - beta1**step)


def column_normalized(matrix: Tensor) -> Tensor:
    """C(D): every column D[..., :, j] divided by its Euclidean norm (in float64); a zero column stays zero."""
    norms = torch.linalg.vector_norm(matrix, dim=-2, keepdim=True, dtype=torch.float64)
    return matrix * norms.clamp_(min=torch.finfo(torch.float64).tiny).reciprocal_().to(matrix.dtype)


def scale_rule(inputs: UpdateInputs, state: dict[str, Any], group: dict[str, Any]) -> None:
    """Steps 2-4 on one weight (``inputs`` is an :class:`~galore_plus.rules.base.UpdateInputs`); the weight is left
    unchanged, on the device, when ``inputs.finite`` is False."""
    require_whole_weight("scale", inputs.weight.shape, inputs.shape, "the column norms need every row")
    outside = outside_subspace(inputs.grad, inputs.basis, inputs.low_rank, inputs.side)
    basis, direction = inputs.basis.to(outside.dtype), inputs.direction.to(outside.dtype)
    inside = basis @ direction if inputs.side == "left" else direction @ basis
    normalized = column_normalized(outside.add_(inside))   # non-finite only where inputs.finite is False
    factor = torch.full((), group["scale"] * rms_matching_ratio((inputs.shape[-2],)), dtype=normalized.dtype,
                        device=normalized.device)
    apply_update(inputs.weight, group["lr"], 1.0 - group["lr"] * group["weight_decay"], inputs.finite,
                 gradient=ScaledGradient(normalized, factor))


SCALE = UpdateRule(scale_rule, direction=scale_momentum_direction, check_group=check_finite_scale,
                   accumulation_refusal=FULL_GRADIENT_REFUSAL)
