"""The ``"frugal"`` update rule: FRUGAL's gradient splitting (Zmushko et al. 2024, arXiv:2411.07837).

FRUGAL(Adam, signSGD) splits the gradient g into the part in the subspace, g_full = P(g), and the rest,
g_free = g - P^-1(P(g)); Adam steps g_full with moments kept in the subspace only, signSGD steps g_free with
no state at all: theta <- theta + P^-1(-eta m_hat / (sqrt(v_hat) + eps)) - eta sign(g_free). For a weight with
gradient G (m, n), basis P (m, r) | Q (r, n), R = P^T G | G Q^T and step t, this rule is

1. M, V: Adam's moments of R, N = (M / (1 - b1^t)) / (sqrt(V / (1 - b2^t)) + eps) (the ``"galore"`` rule's N);
2. the state-full part P N | N Q, times the group's ``scale`` (FRUGAL has no such factor: ``scale=1`` is the
   paper's update; GaLore's convention of a scaled back-projection is kept so the placements compare);
3. the state-free part sign(G - P R) | sign(G - R Q): every entry of the gradient outside the subspace moves
   by exactly one step size, whatever its magnitude;
4. p <- p (1 - lr wd) - lr (scale P N + free_lr_ratio sign(G - P R)).

``free_lr_ratio`` (group key, default 1) is the state-free step size over the state-full one's lr: FRUGAL's
equations use one learning rate eta for both parts. It replaces Fira's full-rank residual, which scales the
same part G - P R by ||N|| / ||R|| per channel instead of taking its sign (so a ``"frugal"`` group cannot set
``full_rank_residual``); the sparse residual is not implemented with it. No state beyond the two low-rank
moments. The full-size G - P R is one float32 temporary (float64 for a float64 weight), like Muon's D.

On FSDP2 row shards every term is local to this process's rows (G - P R from P's rows and the summed R on the
output side, from R's rows and Q on the input side; the sign is elementwise), so the rule runs there unchanged
(tested against one process, tests/test_distributed.py). Refused: per-layer accumulation (the boundary has no
gradient), ``scale="auto"``. Works for 8-bit moments, stacks of matrices and per-layer steps without
accumulation.
"""

from __future__ import annotations

import math
from numbers import Real

from typing import Any

import torch
from torch import Tensor

from ..kernels.dispatch import apply_update
from ..group_keys import Fail, GroupKey, number_in
from ..step.apply import LowRankTerm, ScaledGradient
from ..step.row_blocks import widened_dtype
from ..step.shapes import Side
from .base import UpdateInputs, UpdateRule


def outside_subspace(grad: Tensor, basis: Tensor, low_rank: Tensor, side: Side) -> Tensor:
    """G - P R | G - R Q, the part of G the subspace does not hold (full size, float32 or float64 for a float64
    G; a stack (E, m, n) is handled batched)."""
    grad = grad.to(widened_dtype(grad.dtype))
    basis, low_rank = basis.to(grad.dtype), low_rank.to(grad.dtype)
    return grad - (basis @ low_rank if side == "left" else low_rank @ basis)


def frugal_rule(inputs: UpdateInputs, state: dict[str, Any], group: dict[str, Any]) -> None:
    """Steps 2-4 on one weight (``inputs`` is an :class:`~galore_plus.rules.base.UpdateInputs`); the weight is left
    unchanged, on the device, when ``inputs.finite`` is False."""
    free = outside_subspace(inputs.grad, inputs.basis, inputs.low_rank, inputs.side).sign_()
    ratio = torch.full((), float(group["free_lr_ratio"]), dtype=free.dtype, device=free.device)
    apply_update(inputs.weight, group["lr"], 1.0 - group["lr"] * group["weight_decay"], inputs.finite,
                 low_rank=LowRankTerm(inputs.direction * group["scale"], inputs.basis, inputs.side),
                 gradient=ScaledGradient(free, ratio))


def check_finite_scale(group: dict, fail: Fail) -> None:
    """``scale`` multiplies the step of this family's rules: a finite number >= 0 (not ``"auto"``)."""
    scale = group["scale"]
    if isinstance(scale, bool) or not isinstance(scale, Real) or not 0 <= scale < math.inf:
        fail("scale", f"update_rule {group['update_rule']!r} multiplies its step by scale, a finite number >= 0 "
                      f"('auto' is for update_rule 'galore'), got {scale!r}")


FULL_GRADIENT_REFUSAL = "its step reads the full gradient, which accumulation in the subspace never forms"

FRUGAL = UpdateRule(frugal_rule, keys={"free_lr_ratio": GroupKey(1.0, number_in(0.0, math.inf, False, True))},
                    check_group=check_finite_scale, accumulation_refusal=FULL_GRADIENT_REFUSAL)
