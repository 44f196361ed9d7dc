"""Gradient accumulation in the subspace, for per-layer steps (``enable_per_layer_steps(opt, accumulation_steps=k)``).

The projection is linear: the sum over micro-batches i of R_i = P^T G_i (or G_i Q^T) is the low-rank
gradient of the summed gradient. So each micro-batch's gradient G_i of a projected weight is
projected, in its gradient hook, into an :class:`Accumulator` of R's shape and freed; the step runs
once, at ``optimizer.step()`` (the boundary), from the accumulated R. As in ordinary accumulation the
step's gradient is the sum of the micro-batches' (scale each loss by 1 / k for their mean).

What the accumulator holds per projected weight, besides R's sum (float32, R's shape):

* ``outside``: per channel (column j on the output side, row i on the input side), the sum over
  micro-batches of the energy of G_i outside the subspace, ||G_i,j - (P R_i)_j||^2 (float64, one
  value per channel). It stands in for the energy outside the subspace of the summed gradient,
  ||(G - P R)_j||^2, which differs by the cross terms 2 sum_{i<l} <(G_i - P R_i)_j, (G_l - P R_l)_j>
  (zero for k = 1). Clipping's norm reads it; each micro-batch's own part gives Fira's limiter its norm.
* ``residual_grad``: with a sparse residual (``residual_ratio``) whose index set I exists, the sum of
  G_i at I (float32, |I| values): the residual then steps from the exact summed gradient at I.

A refresh step computes the new basis from the first micro-batch's gradient (the only full gradient
the hook ever sees); every micro-batch of that step is projected on it. So between refreshes the
step equals ordinary accumulation (summed full gradients, then a step) up to float32 rounding; at a
refresh the basis is the first micro-batch's subspace instead of the summed gradient's.

Fira's full-rank residual (``full_rank_residual``) needs the full gradient, which never exists at
the boundary, so each micro-batch applies its own term in its hook:
S_i = c_i (G_i - alpha P R_i) with c_i = ||N_prev|| / (k ||R_i||) per channel, where ||N_prev|| is the
previous boundary's direction norm per channel (``state[ACCUMULATION_FACTOR_KEY]`` of :mod:`galore_plus.rules.fira`) and ||R_i|| the
micro-batch's own (Fira's phi = ||N|| / ||R|| with N one update old and R this micro-batch's); the
norm-growth limiter caps k ||S_i|| at ``norm_growth_limit`` times the previous update's applied
norm (the sum of its micro-batches' limited norms, kept as Fira's ``state[NORM_KEY]``). The boundary
adds lr alpha P N and decays the weight. With one micro-batch this is Fira with N of the previous
update; with k of them the terms' sum is between 1 / sqrt(k) (independent micro-batch noise) and 1
(one common direction) of Fira's on the summed gradient, and micro-batches after the first see a
weight already moved by the earlier ones' terms. The first update has no ||N_prev|| yet: GaLore's
update alone. Fira's term does not depend on the gradient's scale (both G_i and R_i are this
micro-batch's, unclipped), so clipping leaves it alone, as it does with exact accumulation.

Refused with accumulation (``per_layer.enable_per_layer_steps`` names the key): an update rule or projector
whose entry gives an ``accumulation_refusal`` (APOLLO's rule: its whole update is a scaled full-size gradient;
the random projector: not orthonormal, so R's energy is not the gradient's energy inside the subspace), ``scale="auto"`` with
``full_rank_residual`` (its RMS needs the summed gradient's channel norms) and ``residual_warmup=0``
with a residual (I would be chosen at the boundary of step 1, after the micro-batches' values at I
were needed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..kernels.dispatch import apply_update
from ..rules.fira import ACCUMULATION_FACTOR_KEY, NORM_KEY, channel_square_terms
from ..rules.norms import NORM_FLOOR, adam_bias_factor, norm_growth_divisor
from ..sparse_residual.index import flat_index
from ..sparse_residual.values import gather_flat
from .apply import LowRankTerm, ScaledGradient
from .finite import all_finite
from .row_blocks import channel_square_sums
from .shapes import Side


@dataclass
class Accumulator:
    """One projected weight's sums over the micro-batches of an update (see the module docstring).

    ``previous``: the basis this update's refresh replaced (None without a refresh), for the refresh
    hooks at the boundary; ``applied_norm``: the summed limited norms of the Fira terms the
    micro-batches applied (None: none); ``scale``: the clipping coefficient (1, or a 0-d tensor set by clipping).
    """

    low_rank: Tensor
    outside: Tensor
    residual_grad: Tensor | None
    previous: Tensor | None
    applied_norm: Tensor | None
    scale: Tensor | float = 1.0

    def clipped_low_rank(self) -> Tensor:
        """R's sum times the clipping coefficient: what the moments see."""
        return self.low_rank if isinstance(self.scale, float) and self.scale == 1.0 else self.low_rank * self.scale

    def clipped_residual_grad(self) -> Tensor | None:
        """The sum of the gradients at I times the clipping coefficient (None without a residual)."""
        if self.residual_grad is None or isinstance(self.scale, float) and self.scale == 1.0:
            return self.residual_grad
        return self.residual_grad * self.scale

    def square_norm(self) -> Tensor:
        """Estimated ||G||^2 of the summed gradient, before clipping (0-d float32): ||R||^2 + sum of ``outside``."""
        return (self.low_rank.double().square().sum() + self.outside.sum()).float()

    def nbytes(self) -> int:
        """Bytes of the tensors kept until the boundary (``previous`` is the replaced basis, kept only at a refresh)."""
        tensors = [self.low_rank, self.outside, self.residual_grad, self.previous, self.applied_norm]
        return sum(tensor.nbytes for tensor in tensors if tensor is not None)


def outside_energy(grad: Tensor, low_rank: Tensor, basis: Tensor, side: Side) -> Tensor:
    """||G_j - (P R)_j||^2 per channel (float64, (1, n) on the left side, (m, 1) on the right), G never widened whole."""
    squares = channel_square_sums(grad, side == "left")
    return channel_square_terms(squares, 1.0, LowRankTerm(-low_rank, basis, side), low_rank)


def residual_positions(state: dict[str, Any], group: dict[str, Any], step: int, n: int) -> Tensor | None:
    """The flat positions of I when the residual applies at step t (its index exists and t > warmup), else None."""
    if "residual_col" not in state or step <= group["residual_warmup"]:
        return None
    return flat_index(state["residual_row_ptr"], state["residual_col"], n)


def add_micro_batch(
    accumulator: Accumulator | None, weight: Tensor, grad: Tensor, low_rank: Tensor, basis: Tensor, side: Side,
    previous: Tensor | None, state: dict[str, Any], group: dict[str, Any], step: int, micro_batches: int,
) -> Accumulator:
    """Add one micro-batch (gradient ``grad``, its R = ``low_rank`` on ``basis``) to ``accumulator`` (None: the first);
    with Fira's residual, apply this micro-batch's full-rank term now (:func:`micro_batch_fira_term`)."""
    index = residual_positions(state, group, step, weight.shape[1])
    at_index = gather_flat(grad, index).float() if index is not None else None
    outside = outside_energy(grad, low_rank, basis, side)
    applied = None
    if group["full_rank_residual"] and ACCUMULATION_FACTOR_KEY in state:
        applied = micro_batch_fira_term(weight, grad, low_rank, basis, side, outside, state, group, step, micro_batches)
    if accumulator is None:
        return Accumulator(low_rank, outside, at_index, previous, applied)
    accumulator.low_rank.add_(low_rank)
    accumulator.outside.add_(outside)
    if at_index is not None:
        accumulator.residual_grad.add_(at_index)
    if applied is not None:
        accumulator.applied_norm.add_(applied)
    return accumulator


def micro_batch_fira_term(
    weight: Tensor, grad: Tensor, low_rank: Tensor, basis: Tensor, side: Side, outside: Tensor,
    state: dict[str, Any], group: dict[str, Any], step: int, micro_batches: int,
) -> Tensor:
    """p <- p - lr S_i with S_i = c_i (G_i - alpha P R_i), c_i = ||N_prev|| / (k ||R_i||) per channel, limited;
    returns the limited norm of S_i (measured without Adam's bias correction, as Fira does).

    ||N_prev|| is the previous boundary's direction norm per channel (``state[ACCUMULATION_FACTOR_KEY]``); the
    limiter caps k ||S_i|| at ``norm_growth_limit`` times the previous update's applied norm, so the
    update's terms together grow by at most that factor. Nothing is applied where R_i is not finite.
    """
    alpha = group["scale"]
    beta1, beta2 = group["betas"]
    channel_dim = 0 if side == "left" else 1
    phi = state[ACCUMULATION_FACTOR_KEY] / (micro_batches * torch.linalg.vector_norm(low_rank, dim=channel_dim, keepdim=True)
                               .add_(NORM_FLOOR))
    inside = low_rank.double().square().sum(channel_dim, keepdim=True)
    squares = (phi.double().square() * (outside + (1 - alpha) ** 2 * inside)).sum()
    measured = squares.clamp(min=0).sqrt().to(phi.dtype) / adam_bias_factor(step - 1, beta1, beta2)
    divisor = norm_growth_divisor(micro_batches * measured, state.get(NORM_KEY), group["norm_growth_limit"])
    factor = phi / divisor
    finite = all_finite(low_rank)
    apply_update(weight, group["lr"], 1.0, finite, low_rank=LowRankTerm(-alpha * factor * low_rank, basis, side),
                 gradient=ScaledGradient(grad, factor))
    return torch.where(finite, measured / divisor, 0.0)


def fira_boundary_update(
    weight: Tensor, direction: Tensor, basis: Tensor, side: Side, finite: Tensor, accumulator: Accumulator,
    state: dict[str, Any], group: dict[str, Any],
) -> None:
    """The boundary's part of Fira's update under accumulation: p <- p (1 - lr wd) - lr alpha P N (the micro-batches
    applied their full-rank terms); keeps ||N|| per channel for the next update's terms and, once terms were applied,
    their summed norm for the limiter. Nothing changes where ``finite`` is False."""
    lr, decay = group["lr"], 1.0 - group["lr"] * group["weight_decay"]
    channel_norm = torch.linalg.vector_norm(direction, dim=0 if side == "left" else 1, keepdim=True)
    previous = state.get(ACCUMULATION_FACTOR_KEY)
    state[ACCUMULATION_FACTOR_KEY] = torch.where(finite, channel_norm, previous if previous is not None else 0.0)
    if accumulator.applied_norm is not None:
        previous_norm = state.get(NORM_KEY, torch.full((), math.inf, device=weight.device))
        state[NORM_KEY] = torch.where(finite, accumulator.applied_norm, previous_norm)
    apply_update(weight, lr, decay, finite, low_rank=LowRankTerm(group["scale"] * direction, basis, side))
