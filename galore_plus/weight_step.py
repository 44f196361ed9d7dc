"""One GaLore+ step of one projected weight: the only place where the order of a step is written.

Every path calls :func:`step_projected_weight`: ``optimizer.step()``, per-layer hooks, the DDP
communication hook of per-layer mode and FSDP2 row shards. What differs between them is behind a
:class:`WeightLayout` (``LocalLayout`` and ``RowShardLayout`` in :mod:`galore_plus.distributed`):
which rows are local, how the rows a refresh reads are gathered, the sum of the left-side low-rank
gradient over ranks, the cross-rank agreement on finiteness, and how moment zeros are made.

Order of a step: schedule -> refresh (or the stored basis) -> R = P^T G | G Q^T -> finiteness ->
moments (8-bit: dequantised) -> refresh hooks -> Adam direction N -> sparse residual at I ->
update rule -> residual written -> moments stored (8-bit: quantised).

Extension points (plain dicts, lists and functions):

* a projector: an entry of ``projectors.PROJECTORS`` (a :class:`~galore_plus.projectors.Projector`:
  basis function, the gradient rows it reads, fixed side, whether the basis is stored);
* an update rule: an entry of ``update_rules.UPDATE_RULES``, chosen by the group's ``update_rule``;
* a refresh hook: a function appended to :data:`REFRESH_HOOKS` in its own module's source,
  ``hook(exp_avg, exp_avg_sq, previous, basis, side, state, group)``, called at every refresh that
  replaces a basis, with this process's float32 moments (written in place, e.g. a change of
  coordinates into the new basis) and the old and new whole bases;
* the schedule: :func:`basis_schedule` (a per-weight gap kept in ``state`` is read there).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch
from torch import Tensor

from . import quant
from .basis_quant import basis_shape, store_basis, stored_basis
from .dispatch import lowrank_adam_direction
from .finite import all_finite
from .projectors import PROJECTORS, Shape, Side, basis_generator, project, projection_side
from .refresh import Warn, refreshed_basis
from .residual_state import residual_update, write_residual
from .update_rules import UPDATE_RULES, UpdateInputs

RefreshHook = Callable[[Tensor, Tensor, Tensor, Tensor, Side, dict[str, Any], dict[str, Any]], None]

REFRESH_HOOKS: list[RefreshHook] = []


class WeightLayout(Protocol):
    """Where one weight's rows live; (m, n) is the weight as projected (transposed groups already transposed)."""

    shape: Shape
    device: torch.device

    def weight(self) -> Tensor:
        """This process's rows of the weight, a view written in place."""

    def gradient(self) -> Tensor:
        """This process's rows of the gradient, float32."""

    def read_rows(self, rows: Tensor | None) -> Tensor:
        """The float32 gradient rows ``rows`` (all rows when None), the same on every process."""

    def local_basis(self, basis: Tensor, side: Side) -> Tensor:
        """The part of a whole basis that multiplies this process's rows."""

    def reduce_low_rank(self, low_rank: Tensor, side: Side) -> Tensor:
        """The low-rank gradient of the whole weight from this process's part of it."""

    def all_ranks(self, flag: Tensor) -> Tensor:
        """A 0-d bool tensor that is True only when ``flag`` is True on every process."""

    def moment_zeros(self, low_rank: Tensor, side: Side) -> Tensor:
        """Zeros to start a moment of this low-rank gradient (sharded like the weight where it is)."""

    def local(self, moment: Tensor) -> Tensor:
        """This process's part of a moment, a view written in place."""


@dataclass(frozen=True)
class StepContext:
    """What a weight's step needs from its optimizer: seeding, bit width, names for messages, a warn-once."""

    seed: int
    position: int
    optim_bits: int
    label: str
    warn: Warn


def basis_schedule(state: dict[str, Any], group: dict[str, Any], step: int) -> tuple[int, bool]:
    """(refresh count of the basis used at step t >= 1, whether step t computes it): t - 1 = count * gap + 0."""
    gap = group["update_proj_gap"]
    return (step - 1) // gap, (step - 1) % gap == 0


def step_basis(
    layout: WeightLayout, state: dict[str, Any], group: dict[str, Any], side: Side, step: int, context: StepContext
) -> tuple[Tensor, Tensor | None]:
    """(basis of this step, the basis it replaced at a refresh, else None).

    A stored basis is recomputed when the schedule says so, from the gradient rows its projector
    reads, and kept in float32 or, with ``basis_bits=4``, in 4 bits (:mod:`galore_plus.basis_quant`;
    every step then uses the dequantised basis); a projector that stores none regenerates it every
    step from the seeded generator.
    """
    projector = PROJECTORS[group["projector"]]
    count, refresh = basis_schedule(state, group, step)
    generator = basis_generator(context.seed, context.position, count, layout.device)
    if not projector.stores_basis:
        return projector.basis(None, layout.shape, group, side, generator, None), None
    shape = basis_shape(layout.shape, group["rank"], side)
    if not refresh:
        return stored_basis(state, shape), None
    previous = stored_basis(state, shape)
    read = layout.read_rows(projector.rows(group, layout.shape, generator))
    basis = refreshed_basis(read, layout.shape, group, side, generator, previous, context.warn)
    return store_basis(state, basis, group["basis_bits"]), previous


def step_projected_weight(
    layout: WeightLayout, state: dict[str, Any], group: dict[str, Any], context: StepContext
) -> None:
    """One GaLore+ step of a 2-D weight; skipped (with a warning) when its low-rank gradient is not finite."""
    step = state.get("step", 0) + 1
    side = projection_side(layout.shape, group["proj_type"], group["projector"])
    basis, previous = step_basis(layout, state, group, side, step, context)
    local_basis = layout.local_basis(basis, side)
    grad = layout.gradient()
    low_rank = layout.reduce_low_rank(project(grad, local_basis, side), side)
    finite = layout.all_ranks(all_finite(low_rank))
    if not bool(finite):
        context.warn("grad", f"non-finite gradient in {context.label}: that weight's step was skipped "
                             "(moments, weight and step count unchanged)")
        return
    if context.optim_bits == 8:
        quant.load_moments(state)
    if "exp_avg" not in state:
        state["exp_avg"] = layout.moment_zeros(low_rank, side)
        state["exp_avg_sq"] = layout.moment_zeros(low_rank, side)
    exp_avg, exp_avg_sq = layout.local(state["exp_avg"]), layout.local(state["exp_avg_sq"])
    if previous is not None:
        for hook in REFRESH_HOOKS:
            hook(exp_avg, exp_avg_sq, previous, basis, side, state, group)
    state["step"] = step
    beta1, beta2 = group["betas"]
    direction = lowrank_adam_direction(low_rank, exp_avg, exp_avg_sq, step, beta1, beta2, group["eps"])
    weight = layout.weight()
    residual = residual_update(weight, grad, low_rank, direction, basis, side, state, group, step)
    inputs = UpdateInputs(weight, grad, low_rank, direction, local_basis, side, step, finite)
    UPDATE_RULES[group["update_rule"]](inputs, state, group)
    if residual is not None:
        write_residual(weight, residual)
    if context.optim_bits == 8:
        quant.store_moments(state)
