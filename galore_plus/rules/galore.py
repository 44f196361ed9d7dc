"""GaLore's update rule (``update_rule="galore"``): p <- p (1 - lr wd) - lr scale P N, with Fira's full-rank residual
(:mod:`galore_plus.rules.fira`) where the group's ``full_rank_residual`` is on and ``scale="auto"``
(:mod:`galore_plus.rules.auto_scale`)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..kernels.dispatch import apply_update
from ..sparse_residual.step import RESIDUAL_KEYS
from ..step.accumulate import fira_boundary_update
from ..step.apply import LowRankTerm, ScaledGradient
from ..step.row_blocks import channel_square_sums
from .auto_scale import AUTO, lowrank_auto_scale, rms_matching_scale
from .base import UpdateInputs, UpdateRule
from .fira import FIRA_KEYS, FIRA_STATE, NORM_KEY, fira_update, weighted_square_total
from .norms import adam_bias_factor, whole_square_sum


def whole_rms(low_rank: Tensor, inputs: UpdateInputs) -> Tensor:
    """The RMS of a low-rank tensor of this step over the whole weight (:func:`whole_square_sum`)."""
    rows = low_rank.shape[-2] if inputs.side == "left" else inputs.shape[-2]
    return (whole_square_sum(low_rank, inputs.side, inputs.total) / (rows * low_rank.shape[-1])).sqrt()


def galore_update(inputs: UpdateInputs, state: dict[str, Any], group: dict[str, Any]) -> None:
    """GaLore's rule: decoupled weight decay, then lr * scale times P N, or P N + S with the full-rank residual."""
    lr, decay = group["lr"], 1.0 - group["lr"] * group["weight_decay"]
    auto = group["scale"] == AUTO
    if not group["full_rank_residual"]:
        scale = lowrank_auto_scale(inputs.shape, group["rank"], inputs.side) if auto else group["scale"]
        apply_update(inputs.weight, lr * scale, decay, inputs.finite,
                     low_rank=LowRankTerm(inputs.direction, inputs.basis, inputs.side))
        return
    if inputs.accumulated is not None:
        fira_boundary_update(inputs.weight, inputs.direction, inputs.basis, inputs.side, inputs.finite,
                             inputs.accumulated, state, group)
        return
    beta1, beta2 = group["betas"]
    previous = state.get(NORM_KEY, torch.full((), math.inf, device=inputs.grad.device))
    grad_squares = channel_square_sums(inputs.grad, inputs.side == "left")
    factor, low_rank, norm = fira_update(
        grad_squares, inputs.low_rank, inputs.own_low_rank, inputs.direction, inputs.basis, inputs.side,
        1.0 if auto else group["scale"], previous, group["norm_growth_limit"],
        adam_bias_factor(inputs.step, beta1, beta2), inputs.total,
    )
    state[NORM_KEY] = torch.where(inputs.finite, norm, previous)
    if auto:
        squares = weighted_square_total(grad_squares, 1.0, factor, low_rank, inputs.own_low_rank, inputs.total)
        update_rms = squares.clamp(min=0).sqrt().to(factor.dtype) / math.sqrt(inputs.shape[-2] * inputs.shape[-1])
        scale = rms_matching_scale(whole_rms(inputs.direction, inputs), update_rms)
        factor, low_rank = factor * scale, LowRankTerm(low_rank.low_rank * scale, low_rank.basis, low_rank.side)
    apply_update(inputs.weight, lr, decay, inputs.finite, low_rank=low_rank,
                 gradient=ScaledGradient(inputs.grad, factor))


GALORE = UpdateRule(galore_update, keys={**FIRA_KEYS, **RESIDUAL_KEYS}, state=FIRA_STATE)
