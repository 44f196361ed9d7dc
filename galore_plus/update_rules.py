"""Update rules: how a weight is changed from its low-rank Adam direction (a group's ``update_rule`` key).

A rule is an :class:`UpdateRule`: the Adam direction N it reads, and a function
``apply(inputs, state, group) -> None`` that writes ``inputs.weight`` in place.
``apply`` sees everything one weight's step has computed (:class:`UpdateInputs`, all local to this
process's rows of a sharded weight), the weight's optimizer state (a rule may keep tensors or
plain values of its own there; they are checkpointed with the rest) and the parameter group.
It must leave the weight unchanged when ``inputs.finite`` (a 0-d bool tensor on the device)
is False, without reading it on the host (``torch.where`` on the device: the step must not
synchronise), and must never write a non-finite value.

* ``"galore"``: p <- p (1 - lr wd) - lr scale (P N | N Q), one ``addmm_`` per block of rows
  (see :mod:`galore_plus.update`);
  with the group key ``full_rank_residual``, p <- p (1 - lr wd) - lr (scale P N + S), Fira's
  norm-scaled residual S (:mod:`galore_plus.full_rank_residual`, the limiter's norm kept as
  ``state["residual_norm"]``);
  ``scale="auto"`` resolves as in :mod:`galore_plus.auto_scale`.
  N is Adam's bias-corrected direction (:func:`galore_plus.dispatch.lowrank_adam_direction`).
* ``"apollo"``: the gradient scaled per channel or per tensor by ||N|| / ||R||, norm-growth limited
  (APOLLO; :mod:`galore_plus.apollo_update`, group key ``scale_type``; ``scale`` enters as its square root;
  APOLLO's limiter is fixed at 1.01 and the sparse residual is not implemented with it).
  N = M / (sqrt(V) + eps), without bias correction (:func:`galore_plus.apollo_update.apollo_moments_direction`).
* ``"muon"``: Muon's Newton-Schulz-orthogonalised step of P N + (G - P R), N the Nesterov momentum of R
  (:mod:`galore_plus.muon_update`; ``betas[0]`` is the momentum).
* ``"frugal"``: FRUGAL, scale P N plus a state-free signSGD step of the rest, free_lr_ratio sign(G - P R)
  (:mod:`galore_plus.frugal_update`, group key ``free_lr_ratio``).
* ``"ldadam"``: GaLore's update with LDAdam's error feedback: the step projects G + E, and E <- (G + E) - P R, a
  full-size buffer (:mod:`galore_plus.ldadam_update`).
* ``"scale"``: SCALE's column-normalised step of P N + (G - P R), N the bias-corrected momentum of R
  (:mod:`galore_plus.scale_update`; ``betas[0]`` is the momentum).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from .accumulate import Accumulator, fira_boundary_update
from .apollo_update import apollo_factor, apollo_moments_direction, apollo_step_size
from .auto_scale import AUTO, lowrank_auto_scale, rms_matching_scale
from .dispatch import apply_update, lowrank_adam_direction
from .muon_update import muon_momentum_direction, muon_rule
from .frugal_update import frugal_rule
from .ldadam_update import ERROR_KEY, error_feedback_layout, ldadam_rule
from .scale_update import scale_momentum_direction, scale_rule
from .full_rank_residual import (
    Total, adam_bias_factor, fira_update, single_process_total, weighted_square_total, whole_square_sum,
)
from .projectors import Shape, Side
from .row_blocks import channel_square_sums
from .update import LowRankTerm, ScaledGradient


@dataclass(frozen=True)
class UpdateInputs:
    """One weight's step, as an update rule sees it (every tensor is this process's rows).

    ``weight``: the parameter (transposed to (m, n) for ``transposed`` groups), any float dtype;
    ``shape``: (m, n) of the whole weight (a sharded weight's ``weight`` holds some of its rows), or
    (E, m, n) for a stack of matrices, whose every tensor below has the leading dimension E and whose
    norms and limiter states are one per expert, (E, 1, 1);
    ``grad``: its gradient in the parameter's dtype (no float32 copy of a bfloat16 one: a rule
    reads it a block of rows at a time, :mod:`galore_plus.row_blocks`; may hold NaN/Inf: then
    ``finite`` is False); ``low_rank``: R = P^T G | G Q^T (summed over ranks on the left side); ``direction``: N, the rule's Adam
    direction of R (when ``finite`` is False it may hold NaN/Inf: a rule masks what it multiplies
    in); ``basis``: P (these rows) | Q; ``step``: t >= 1;
    ``finite``: a 0-d bool tensor on the weight's device, False when this step must leave the
    weight unchanged; ``local_low_rank``: this process's rows' part of R before the sum over ranks
    (P^T G of these rows on the left side; None: ``low_rank`` itself, as in a single process and on
    the right side); ``total``: the sum over processes of a tensor each computed from its own rows
    (the tensor itself in a single process; no host read); ``accumulated``: at the boundary of per-layer
    accumulation, the weight's :class:`~galore_plus.accumulate.Accumulator` (``grad`` is then None and
    ``low_rank`` the accumulated R; only the rules' terms :mod:`galore_plus.accumulate` defines are allowed).
    """

    weight: Tensor
    shape: Shape
    grad: Tensor | None
    low_rank: Tensor
    direction: Tensor
    basis: Tensor
    side: Side
    step: int
    finite: Tensor
    local_low_rank: Tensor | None = None
    total: Total = single_process_total
    accumulated: Accumulator | None = None

    @property
    def own_low_rank(self) -> Tensor:
        """This process's part of R: ``local_low_rank``, or ``low_rank`` when that is None."""
        return self.low_rank if self.local_low_rank is None else self.local_low_rank


ApplyFunction = Callable[[UpdateInputs, dict[str, Any], dict[str, Any]], None]
DirectionFunction = Callable[[Tensor, Tensor, Tensor, int, float, float, float], Tensor]


@dataclass(frozen=True)
class UpdateRule:
    """One entry of :data:`UPDATE_RULES`.

    * ``apply(inputs, state, group)``: writes ``inputs.weight`` (see the module docstring);
    * ``direction(low_rank, exp_avg, exp_avg_sq, step, beta1, beta2, eps)``: updates the two
      moments in place with this step's low-rank gradient R and returns the direction N that
      ``apply`` reads as ``inputs.direction`` (the step also checks that N is finite).
    * ``keys``: the group keys it (or what it composes with, the sparse residual) reads besides
      those every projected step reads; a group with this rule may set no other rule key.
    * ``reads_gradient``: ``apply`` reads ``inputs.grad`` without the terms :mod:`galore_plus.accumulate`
      defines, so per-layer accumulation (no gradient at the boundary) is refused.
    * ``gradient_source(layout, state)``: where the step reads its gradient instead of the weight's layout (a
      layout of the same weight: LDAdam's error feedback adds its buffer), or None.
    * ``full_size_state``: the state keys of the float32 tensors of the stepped weight's shape it keeps (the memory
      estimator counts them, the checkpoint check knows their shape).
    """

    apply: ApplyFunction
    direction: DirectionFunction = lowrank_adam_direction
    keys: tuple[str, ...] = ()
    reads_gradient: bool = False
    gradient_source: Callable[[Any, dict[str, Any]], Any] | None = None
    full_size_state: tuple[str, ...] = ()


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
    previous = state.get("residual_norm", torch.full((), math.inf, device=inputs.grad.device))
    grad_squares = channel_square_sums(inputs.grad, inputs.side == "left")
    factor, low_rank, norm = fira_update(
        grad_squares, inputs.low_rank, inputs.own_low_rank, inputs.direction, inputs.basis, inputs.side,
        1.0 if auto else group["scale"], previous, group["norm_growth_limit"],
        adam_bias_factor(inputs.step, beta1, beta2), inputs.total,
    )
    state["residual_norm"] = torch.where(inputs.finite, norm, previous)
    if auto:
        squares = weighted_square_total(grad_squares, 1.0, factor, low_rank, inputs.own_low_rank, inputs.total)
        update_rms = squares.clamp(min=0).sqrt().to(factor.dtype) / math.sqrt(inputs.shape[-2] * inputs.shape[-1])
        scale = rms_matching_scale(whole_rms(inputs.direction, inputs), update_rms)
        factor, low_rank = factor * scale, LowRankTerm(low_rank.low_rank * scale, low_rank.basis, low_rank.side)
    apply_update(inputs.weight, lr, decay, inputs.finite, low_rank=low_rank,
                 gradient=ScaledGradient(inputs.grad, factor))


def apollo_rule(inputs: UpdateInputs, state: dict[str, Any], group: dict[str, Any]) -> None:
    """APOLLO's rule: steps 3-5 of :mod:`galore_plus.apollo_update`'s docstring on one weight.

    ``inputs.direction`` is APOLLO's N (:func:`~galore_plus.apollo_update.apollo_moments_direction`);
    the limiter's norm is kept as ``state["apollo_norm"]``. When ``inputs.finite`` is False the
    weight and the stored norm are left as they were (``inf`` stands for "no norm yet": it limits nothing).
    """
    beta1, beta2 = group["betas"]
    previous = state.get("apollo_norm")
    factor, norm = apollo_factor(inputs.grad, inputs.low_rank, inputs.direction, inputs.side, group["scale_type"],
                                 group["scale"], previous, inputs.total)
    kept = previous if previous is not None else torch.full_like(norm, math.inf)
    state["apollo_norm"] = torch.where(inputs.finite, norm, kept)
    apply_update(inputs.weight, apollo_step_size(group["lr"], inputs.step, beta1, beta2),
                 1.0 - group["lr"] * group["weight_decay"], inputs.finite, gradient=ScaledGradient(inputs.grad, factor))


UPDATE_RULES: dict[str, UpdateRule] = {
    "galore": UpdateRule(galore_update, keys=("full_rank_residual", "norm_growth_limit", "residual_ratio",
                                              "residual_warmup", "residual_mode")),
    "apollo": UpdateRule(apollo_rule, direction=apollo_moments_direction, keys=("scale_type",), reads_gradient=True),
    "muon": UpdateRule(muon_rule, direction=muon_momentum_direction, reads_gradient=True),
    "frugal": UpdateRule(frugal_rule, keys=("free_lr_ratio",), reads_gradient=True),
    "ldadam": UpdateRule(ldadam_rule, reads_gradient=True, gradient_source=error_feedback_layout,
                         full_size_state=(ERROR_KEY,)),
    "scale": UpdateRule(scale_rule, direction=scale_momentum_direction, reads_gradient=True),
}
