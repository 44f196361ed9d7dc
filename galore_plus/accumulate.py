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
  (zero for k = 1; the part of micro-batch gradients outside a top-r subspace is mostly noise, so
  the cross terms are small against the energies). Clipping's norm and Fira's limiter read it.
* ``residual_grad``: with a sparse residual (``residual_ratio``) whose index set I exists, the sum of
  G_i at I (float32, |I| values): the residual then steps from the exact summed gradient at I.

A refresh step computes the new basis from the first micro-batch's gradient (the only full gradient
the hook ever sees); every micro-batch of that step is projected on it. So between refreshes the
step equals ordinary accumulation (summed full gradients, then a step) up to float32 rounding; at a
refresh the basis is the first micro-batch's subspace instead of the summed gradient's.

Fira's full-rank residual (``full_rank_residual``) needs the full summed gradient, which never
exists. Its update is alpha P N + c (G - alpha P R) with c = phi / divisor per channel; here c is the
factor computed at the *previous* boundary (``state["accumulation_factor"]``, none before the first
step, so step 1 is GaLore's update alone), and c G_i is added to the weight in each micro-batch's hook
(lr of that moment, no weight decay), while the boundary adds lr alpha P (N - c R) and decays the
weight. Micro-batches after the first therefore see a weight already moved by the earlier ones'
full-rank terms. At the boundary phi, the limiter's norm (from ``outside`` plus (1 - alpha)^2 ||R_j||^2,
exact for an orthonormal basis but for the cross terms) and the next factor are computed from the
unclipped accumulated R: Fira's residual does not depend on the gradient's scale (phi scales as
1 / ||R||), so clipping leaves it alone, as it does for exact accumulation.

Refused with accumulation (``per_layer.enable_per_layer_steps`` names the key): ``update_rule="apollo"``
(its whole update is a scaled full-size gradient), ``projector="random"`` (not orthonormal, so R's
energy is not the gradient's energy inside the subspace), ``scale="auto"`` with
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

from .dispatch import apply_update
from .finite import all_finite
from .full_rank_residual import adam_bias_factor, channel_square_terms, norm_growth_divisor, residual_scaling
from .projectors import Side
from .residual import flat_index, gather_flat
from .row_blocks import channel_square_sums
from .update import LowRankTerm, ScaledGradient

FACTOR_KEY = "accumulation_factor"


@dataclass
class Accumulator:
    """One projected weight's sums over the micro-batches of an update (see the module docstring).

    ``previous``: the basis this update's refresh replaced (None without a refresh), for the refresh
    hooks at the boundary; ``applied_factor``: the Fira factor added with each micro-batch's gradient
    (None: none); ``scale``: the clipping coefficient (1, or a 0-d tensor set by clipping).
    """

    low_rank: Tensor
    outside: Tensor
    residual_grad: Tensor | None
    previous: Tensor | None
    applied_factor: Tensor | None
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
        tensors = [self.low_rank, self.outside, self.residual_grad, self.previous]
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
    previous: Tensor | None, state: dict[str, Any], group: dict[str, Any], step: int,
) -> Accumulator:
    """Add one micro-batch (gradient ``grad``, its R = ``low_rank`` on ``basis``) to ``accumulator`` (None: the first).

    With Fira's residual and a factor from the last boundary, adds lr c G to the weight now (nothing
    where R is not finite: a non-finite G makes R non-finite, and the boundary then skips the step).
    """
    index = residual_positions(state, group, step, weight.shape[1])
    at_index = gather_flat(grad, index).float() if index is not None else None
    factor = state.get(FACTOR_KEY) if group["full_rank_residual"] else None
    if factor is not None:
        apply_update(weight, group["lr"], 1.0, all_finite(low_rank), gradient=ScaledGradient(grad, factor))
    outside = outside_energy(grad, low_rank, basis, side)
    if accumulator is None:
        return Accumulator(low_rank, outside, at_index, previous, factor)
    accumulator.low_rank.add_(low_rank)
    accumulator.outside.add_(outside)
    if at_index is not None:
        accumulator.residual_grad.add_(at_index)
    return accumulator


def lagged_fira_update(
    weight: Tensor, direction: Tensor, basis: Tensor, side: Side, step: int, finite: Tensor,
    accumulator: Accumulator, state: dict[str, Any], group: dict[str, Any],
) -> None:
    """The boundary's part of Fira's update (module docstring): p <- p (1 - lr wd) - lr alpha P (N - c_prev R),
    and the factor c of this step (kept for the next micro-batches) and the limiter's norm, both from the
    unclipped accumulated R and ``outside``. Nothing changes where ``finite`` is False."""
    lr, decay = group["lr"], 1.0 - group["lr"] * group["weight_decay"]
    alpha = group["scale"]
    beta1, beta2 = group["betas"]
    summed = accumulator.low_rank
    phi = residual_scaling(direction, summed, side)
    inside = summed.double().square().sum(0 if side == "left" else 1, keepdim=True)
    squares = (phi.double().square() * (accumulator.outside + (1 - alpha) ** 2 * inside)).sum()
    measured = squares.clamp(min=0).sqrt().to(phi.dtype) / adam_bias_factor(step, beta1, beta2)
    previous_norm = state.get("residual_norm", torch.full((), math.inf, device=phi.device))
    divisor = norm_growth_divisor(measured, previous_norm, group["norm_growth_limit"])
    factor = phi / divisor
    state["residual_norm"] = torch.where(finite, measured / divisor, previous_norm)
    previous_factor = accumulator.applied_factor
    state[FACTOR_KEY] = torch.where(finite, factor, previous_factor if previous_factor is not None else 0.0)
    low_rank = direction if previous_factor is None else direction - previous_factor * summed
    apply_update(weight, lr, decay, finite, low_rank=LowRankTerm(alpha * low_rank, basis, side))
