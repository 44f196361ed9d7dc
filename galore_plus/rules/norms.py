"""Norms shared by the update rules that scale by norm ratios and limit norm growth (Fira's residual, APOLLO).

Every norm "over the whole weight" is the whole weight's also when its rows are split over processes
(FSDP2): a function that reads this process's rows takes ``total``, the sum over processes of a value
each computed from its own rows (the layout's ``total``; in a single process the value itself).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..step.layouts import single_process_total
from ..step.shapes import Side
from ..step.stacks import matrix_sum

NORM_FLOOR = 1e-8

Total = Callable[[Tensor], Tensor]


def whole_square_sum(low_rank: Tensor, side: Side, total: Total = single_process_total) -> Tensor:
    """The sum of squares of a low-rank tensor of a step over the whole weight: a left-side one (r x n) is
    whole on every process, a right-side one (m x r) holds this process's rows (summed by ``total``); one sum per
    expert of a stack."""
    squares = matrix_sum(low_rank.square())
    return squares if side == "left" else total(squares)


def adam_bias_factor(step: int, beta1: float, beta2: float) -> float:
    """sqrt(1 - b2^t) / (1 - b1^t): how much Adam's bias correction enlarges M / sqrt(V) at step t."""
    return (1 - beta2**step) ** 0.5 / (1 - beta1**step)


def channel_norm_ratio(direction: Tensor, low_rank: Tensor, side: Side) -> Tensor:
    """||N|| / (||R|| + 1e-8) over the rank dimension (Fira's phi, APOLLO's channel-wise s), shaped to broadcast
    over the full-size gradient.

    Output side (N, R of shape (r, n)): one value per column, shape (1, n).
    Input side (N, R of shape (m, r)): one value per row, shape (m, 1).
    """
    dim = -2 if side == "left" else -1
    direction_norm = torch.linalg.vector_norm(direction, dim=dim, keepdim=True)
    return direction_norm / torch.linalg.vector_norm(low_rank, dim=dim, keepdim=True).add_(NORM_FLOOR)


def norm_growth_divisor(measured: Tensor, previous_norm: Tensor | None, limit: float | None) -> Tensor | float:
    """max(s_t / (s_{t-1} + 1e-8), gamma) / gamma: dividing by it caps the growth of a norm over the last
    step's at gamma = ``limit``; 1 on the first step (``previous_norm`` None or +inf) or without a limit."""
    if previous_norm is None or limit is None:
        return 1.0
    return (measured / (previous_norm + NORM_FLOOR)).clamp_(min=limit) / limit
