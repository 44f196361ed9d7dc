"""APOLLO's update rule (Zhu et al. 2024, arXiv:2412.05270): the raw gradient, scaled by ||N|| / ||R||.

For a projected weight with gradient G (m, n) of any float dtype, low-rank gradient R = P^T G or G Q^T
(usually from the ``random`` basis of :mod:`galore_plus.projectors.random`) and step t >= 1:

1. M, V: Adam moments of R (:func:`galore_plus.rules.adam.update_moments`);
2. N = M / (sqrt(V) + eps): APOLLO puts Adam's bias correction into the step size, not into N;
3. s = ||N|| / (||R|| + 1e-8), either per channel (``scale_type="channel"``: one factor per row
   of G for a right-side basis, per column for a left-side one, i.e. along the dimension the basis
   does not project) or once for the whole tensor (``"tensor"``, APOLLO-Mini);
4. U = s G, limited by Fira's norm-growth limiter: when ||U|| exceeds 1.01 times the previous
   step's (limited) norm, U is scaled down to exactly that; the limited norm is kept for the next
   step (a 0-d float32 tensor, the only state besides the two moments). ||U|| is computed from G's
   per-channel sums of squares (one pass over G a block of rows at a time) and U is never formed: the weight is updated with one ``addcmul_`` of G and
   the per-channel factor per block of rows (:func:`galore_plus.step.apply.apply_update`);
5. p <- p (1 - lr wd) - lr sqrt(1 - b2^t) / (1 - b1^t) sqrt(scale) U.

The conventions are those of ``apollo_torch.APOLLOAdamW`` 1.0.3 with its defaults
(``scale_front=False``, ``disable_nl=False``): ``scale`` enters as its square root, after the
limiter, and ``eps`` is added to sqrt(V) before any bias correction. Two differences, both
deliberate: weight decay is applied in ``torch.optim.AdamW``'s order (the old weight is decayed;
``apollo_torch`` decays the already-updated one), and the channel axis follows the projected side,
so ``proj_type="reverse_std"`` works (``apollo_torch`` picks the axis from the shape alone and then
fails to broadcast).

Registered as ``UPDATE_RULES["apollo"]`` (direction :func:`apollo_moments_direction`, rule
:func:`apollo_rule`; group keys ``update_rule="apollo"``,
``scale_type``, ``scale``). Presets: :data:`galore_plus.presets.APOLLO` and ``APOLLO_MINI``.
Everything here stays on the device: no value is read back to the host.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..group_keys import Fail, GroupKey, choice
from ..kernels.dispatch import apply_update
from ..state.tensors import StateTensor, per_matrix_scalar
from ..step.apply import ScaledGradient
from ..step.row_blocks import channel_square_sums
from ..step.layouts import single_process_total
from ..step.shapes import Side
from ..step.stacks import matrix_sum
from .adam import update_moments
from .auto_scale import AUTO
from .base import UpdateInputs, UpdateRule
from .norms import (
    NORM_FLOOR, Total, adam_bias_factor, channel_norm_ratio, norm_growth_divisor, whole_square_sum,
)

SCALE_TYPES = ("channel", "tensor")
NORM_GROWTH_LIMIT = 1.01
NORM_KEY = "apollo_norm"   # the state key of the limiter's norm


def apollo_direction(exp_avg: Tensor, exp_avg_sq: Tensor, eps: float) -> Tensor:
    """N = M / (sqrt(V) + eps), from moments already updated with this step's low-rank gradient."""
    return exp_avg / exp_avg_sq.sqrt().add_(eps)


def apollo_moments_direction(
    low_rank_grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: int, beta1: float, beta2: float, eps: float
) -> Tensor:
    """Steps 1-2: update the moments in place with R and return :func:`apollo_direction` (``step`` is not used:
    the bias corrections go into :func:`apollo_step_size`). The direction of ``UPDATE_RULES["apollo"]``."""
    update_moments(low_rank_grad, exp_avg, exp_avg_sq, beta1, beta2)
    return apollo_direction(exp_avg, exp_avg_sq, eps)


def apollo_step_size(lr: float, step: int, beta1: float, beta2: float) -> float:
    """lr sqrt(1 - b2^t) / (1 - b1^t): Adam's bias corrections, applied to the step size."""
    return lr * adam_bias_factor(step, beta1, beta2)


def gradient_scaling(direction: Tensor, low_rank_grad: Tensor, side: Side, scale_type: str,
                     total: Total = single_process_total) -> Tensor:
    """s = ||N|| / (||R|| + 1e-8): shape (m, 1) or (1, n) per channel, 0-d per tensor (for a stack of matrices:
    (E, m, 1), (E, 1, n) or (E, 1, 1)).

    A right-side basis keeps G's rows in R (m, r), so channels are rows; a left-side basis keeps
    its columns in R (r, n), so channels are columns. Per tensor, the norms are the whole weight's
    (``total`` sums a right-side R's and N's rows over processes).
    """
    if scale_type == "tensor":
        direction_norm = whole_square_sum(direction, side, total).sqrt()
        return direction_norm / (whole_square_sum(low_rank_grad, side, total).sqrt() + NORM_FLOOR)
    return channel_norm_ratio(direction, low_rank_grad, side)  # Fira's per-channel phi is the same ratio


def scaled_norm(grad: Tensor, scaling: Tensor, side: Side, total: Total = single_process_total) -> Tensor:
    """||s G|| without forming s G: from G's per-channel sums of squares (channels along ``side``, a block of
    rows at a time, any dtype; a 0-d s scales them all), over every process's rows (``total``)."""
    squares = channel_square_sums(grad, side == "left")
    return total(matrix_sum(scaling.double().square() * squares)).sqrt().to(scaling.dtype)


def apollo_factor(
    grad: Tensor, low_rank_grad: Tensor, direction: Tensor, side: Side, scale_type: str, scale: float,
    previous_norm: Tensor | None, total: Total = single_process_total,
) -> tuple[Tensor, Tensor]:
    """(f, the limited norm of s G to keep for the next step), where U = f G = sqrt(scale) * limited(s G).

    f has the shape of s (0-d, (m, 1) or (1, n)), so the full-size U is never formed here; on the
    first step (``previous_norm`` None) nothing is limited. ``direction`` is :func:`apollo_direction`.
    """
    scaling = gradient_scaling(direction, low_rank_grad, side, scale_type, total)
    norm = scaled_norm(grad, scaling, side, total)
    if previous_norm is None:
        return times(scaling, math.sqrt(scale)), norm
    divisor = norm_growth_divisor(norm, previous_norm, NORM_GROWTH_LIMIT)
    return scaling * times(divisor.reciprocal(), math.sqrt(scale)), norm / divisor


def times(tensor: Tensor, number: float) -> Tensor:
    """``tensor * number``, or ``tensor`` itself when ``number`` is 1 (the same values: x * 1 is exact)."""
    return tensor if number == 1.0 else tensor * number


def apollo_rule(inputs: UpdateInputs, state: dict[str, Any], group: dict[str, Any]) -> None:
    """APOLLO's rule: steps 3-5 of :mod:`galore_plus.rules.apollo`'s docstring on one weight.

    ``inputs.direction`` is APOLLO's N (:func:`~galore_plus.rules.apollo.apollo_moments_direction`);
    the limiter's norm is kept as ``state[NORM_KEY]``. When ``inputs.finite`` is False the
    weight and the stored norm are left as they were (``inf`` stands for "no norm yet": it limits nothing).
    """
    beta1, beta2 = group["betas"]
    previous = state.get(NORM_KEY)
    factor, norm = apollo_factor(inputs.grad, inputs.low_rank, inputs.direction, inputs.side, group["scale_type"],
                                 group["scale"], previous, inputs.total)
    kept = previous if previous is not None else torch.full_like(norm, math.inf)
    state[NORM_KEY] = torch.where(inputs.finite, norm, kept)
    apply_update(inputs.weight, apollo_step_size(group["lr"], inputs.step, beta1, beta2),
                 1.0 - group["lr"] * group["weight_decay"], inputs.finite, gradient=ScaledGradient(inputs.grad, factor))


def check_scale(group: dict, fail: Fail) -> None:
    """APOLLO's ``scale`` is a number >= 0 (the update is multiplied by its square root)."""
    if group["scale"] == AUTO:
        fail("scale", f"{AUTO!r} is for update_rule 'galore'; update_rule 'apollo' needs a number (APOLLO: 1, "
                      "APOLLO-Mini: 128)")
    if group["scale"] < 0:
        fail("scale", f"update_rule 'apollo' multiplies by sqrt(scale); scale must be >= 0, got {group['scale']!r}")


APOLLO_RULE = UpdateRule(
    apollo_rule, direction=apollo_moments_direction, keys={"scale_type": GroupKey("channel", choice(SCALE_TYPES))},
    state={NORM_KEY: StateTensor(per_matrix_scalar)}, check_group=check_scale,
    accumulation_refusal="APOLLO's update is a scaled full-size gradient, which accumulation in the subspace never forms",
)
