"""One GaLore+ step of one projected weight: the only place where the order of a step is written.

Every path calls :func:`step_projected_weight`: ``optimizer.step()``, per-layer hooks, the DDP
communication hook of per-layer mode and FSDP2 row shards. What differs between them is behind a
:class:`WeightLayout` (``LocalLayout`` and ``RowShardLayout`` in :mod:`galore_plus.step.layouts`):
which rows are local, how the rows a refresh reads are gathered, the sum of the left-side low-rank
gradient over ranks, the cross-rank agreement on finiteness, and how moment zeros are made.

Per-layer accumulation (:mod:`galore_plus.step.accumulate`) splits the order at R: each micro-batch runs
:func:`accumulate_projected_gradient` (the first one the schedule and refresh, every one R into the
weight's accumulator), and the boundary runs :func:`step_accumulated_weight`, the rest of the order
from the accumulated R (:func:`finish_step`, shared with :func:`step_projected_weight`).

Order of a step: schedule -> refresh (or the stored basis) -> R = P^T G | G Q^T -> moments (8-bit:
dequantised) -> refresh hooks -> moments updated and the update rule's direction N -> finiteness ->
sparse residual at I -> update rule -> residual written -> moments stored (8-bit: quantised).

A weight is a matrix (m, n) or a stack of E independent matrices (E, m, n) (mixture-of-experts
weights; a convolution kernel (out, in, kh, kw) is stepped as the matrix (out, in kh kw)): a stack
is stepped batched, each expert with its own basis, moments, norms and finiteness (a (E, 1, 1)
bool), as if its experts were separate weights (:mod:`galore_plus.step.stacks`).

A step without a refresh reads nothing on the host: finiteness is a 0-d bool tensor on the device.
When R, N or V is not finite, ``torch.where`` keeps the old moments and the update rule leaves
the weight unchanged, masking N (which may then be non-finite) where it multiplies it in; the
residual likewise keeps its moments and p at I. The step still counts in t (the schedule and bias
corrections are host ints), and each skip adds one to a device-side counter (:class:`SkippedSteps`)
that is read, with one warning per optimizer, at the next refresh or ``state_dict()``.

Extension points (plain dicts, lists and functions):

* a projector: an entry of ``galore_plus.projectors.PROJECTORS`` (a :class:`~galore_plus.projectors.base.Projector`:
  basis function, the gradient rows it reads, fixed side, whether the basis is stored);
* an update rule: an entry of ``galore_plus.rules.UPDATE_RULES`` (an :class:`~galore_plus.rules.base.UpdateRule`:
  the direction N it reads and how it writes the weight), chosen by the group's ``update_rule``;
* a refresh hook: a function listed in :data:`REFRESH_HOOKS` (moment transfer is one),
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

from ..projectors import PROJECTORS, projection_side
from ..projectors.generators import basis_generators
from ..rules import UPDATE_RULES
from ..rules.base import UpdateInputs
from ..sparse_residual.step import residual_update, write_residual
from ..state import moments_8bit
from ..state.basis_4bit import store_basis, stored_basis
from .accumulate import Accumulator, add_micro_batch
from .finite import matrix_finite
from .moment_transfer import transfer_moments_at_refresh
from .projection import project
from .refresh import Warn, refreshed_basis
from .refresh_schedule import (
    after_refresh, fixed_refresh_count, max_gap, overlap_value, schedule_from_state, store_schedule,
)
from .shapes import Shape, Side, basis_shape

RefreshHook = Callable[[Tensor, Tensor, Tensor, Tensor, Side, dict[str, Any], dict[str, Any]], None]

REFRESH_HOOKS: list[RefreshHook] = [transfer_moments_at_refresh]


class WeightLayout(Protocol):
    """Where one weight's rows live; (m, n) or (E, m, n) is the weight as projected (transposed groups already
    transposed, a convolution kernel as a matrix)."""

    shape: Shape
    device: torch.device

    def weight(self) -> Tensor:
        """This process's rows of the weight, a view written in place."""

    def gradient(self) -> Tensor:
        """This process's rows of the gradient, in the parameter's dtype (no float32 copy of a bfloat16 one)."""

    def read_rows(self, rows: Tensor | None) -> Tensor:
        """The float32 gradient rows ``rows`` (all rows when None), the same on every process."""

    def local_basis(self, basis: Tensor, side: Side) -> Tensor:
        """The part of a whole basis that multiplies this process's rows."""

    def reduce_low_rank(self, low_rank: Tensor, side: Side) -> Tensor:
        """The low-rank gradient of the whole weight from this process's part of it (which is left unchanged)."""

    def all_ranks(self, flag: Tensor) -> Tensor:
        """A 0-d bool tensor that is True only when ``flag`` is True on every process."""

    def moment_zeros(self, low_rank: Tensor, side: Side) -> Tensor:
        """Zeros to start a moment of this low-rank gradient (sharded like the weight where it is)."""

    def local(self, moment: Tensor) -> Tensor:
        """This process's part of a moment, a view written in place."""

    def total(self, value: Tensor) -> Tensor:
        """The sum over processes of ``value``, which each computed from its own rows (no host read)."""


class SkippedSteps:
    """Device-side counts of skipped weight steps per parameter group; only :meth:`report` reads them."""

    def __init__(self) -> None:
        self.kept: dict[tuple[str, torch.device], Tensor] = {}
        self.steps: dict[tuple[str, torch.device], int] = {}

    def add(self, label: str, kept: Tensor) -> None:
        """Count one weight step of group ``label``, skipped when the 0-d bool ``kept`` is False.

        Steps are counted on the host and kept ones on the device (one addition, no host read). A
        stack's ``kept`` (E, 1, 1) counts one step per expert.
        """
        key = (label, kept.device)
        count = kept.to(torch.int64) if kept.dim() == 0 else kept.sum()
        if key in self.kept:
            self.kept[key].add_(count)
        else:
            self.kept[key] = count
        self.steps[key] = self.steps.get(key, 0) + kept.numel()

    def report(self, warn: Warn) -> None:
        """Read the counts (a host synchronisation), warn if any step was skipped, and reset them."""
        skipped = {}
        for (label, device), kept in self.kept.items():
            skipped[label] = skipped.get(label, 0) + self.steps[label, device] - int(kept)
        self.kept.clear()
        self.steps.clear()
        skipped = {label: count for label, count in skipped.items() if count}
        if skipped:
            where = ", ".join(f"{label} ({count})" for label, count in skipped.items())
            warn("grad", f"non-finite values (gradient, or moments overflowing) in weight steps of {where}: "
                         "those steps were skipped (moments, residual and weight unchanged; the step still counts)")


@dataclass(frozen=True)
class StepContext:
    """What a weight's step needs from its optimizer: seeding, bit width, names for messages, warnings."""

    seed: int
    position: int
    optim_bits: int
    label: str
    warn: Warn
    skipped: SkippedSteps


def basis_schedule(state: dict[str, Any], group: dict[str, Any], step: int) -> tuple[int, bool]:
    """(refresh count of the basis used at step t >= 1, whether step t computes it).

    Fixed gap: from :func:`~galore_plus.step.refresh_schedule.fixed_refresh_count` (refreshes done by the
    end of steps t and t - 1). Adaptive gap (``adaptive_gap``): the weight's own
    :class:`~galore_plus.step.refresh_schedule.RefreshSchedule` in ``state`` says when.
    """
    if group["adaptive_gap"]:
        schedule = schedule_from_state(state, group["update_proj_gap"])
        refresh = step >= schedule.next_step
        return (schedule.count if refresh else schedule.count - 1), refresh
    gap = group["update_proj_gap"]
    done = fixed_refresh_count(step, gap)
    return done - 1, done > fixed_refresh_count(step - 1, gap)


def record_refresh(state: dict[str, Any], group: dict[str, Any], step: int, previous: Tensor | None, basis: Tensor | None,
                   side: Side) -> None:
    """After a refresh at step t: advance an adaptive schedule (reads the subspace overlap on the host, at a refresh only)."""
    if not group["adaptive_gap"]:
        return
    overlap = overlap_value(previous, basis, side)
    largest = max_gap(group["update_proj_gap"], group["max_update_proj_gap"])
    schedule = schedule_from_state(state, group["update_proj_gap"])
    store_schedule(state, after_refresh(schedule, step, overlap, group["gap_overlap_threshold"],
                                        group["gap_patience"], largest))


def step_basis(
    layout: WeightLayout, state: dict[str, Any], group: dict[str, Any], side: Side, step: int, context: StepContext
) -> tuple[Tensor, Tensor | None]:
    """(basis of this step, the basis it replaced at a refresh, else None).

    A stored basis is recomputed when the schedule says so, from the gradient rows its projector
    reads, and kept in float32 or, with ``basis_bits=4``, in 4 bits (:mod:`galore_plus.state.basis_4bit`;
    every step then uses the dequantised basis); a projector that stores none regenerates it every
    step from the seeded generator.
    """
    projector = PROJECTORS[group["projector"]]
    count, refresh = basis_schedule(state, group, step)
    shape = basis_shape(layout.shape, group["rank"], side)
    if projector.stores_basis and not refresh:   # before the generator: a step without a refresh creates no object
        return stored_basis(state, shape), None
    generator = basis_generators(context.seed, context.position, count, layout.shape, layout.device)
    if not projector.stores_basis:
        if refresh:
            record_refresh(state, group, step, None, None, side)
        return projector.basis(None, layout.shape, group, side, generator, None), None
    context.skipped.report(context.warn)
    previous = stored_basis(state, shape)
    rows = projector.rows(group, layout.shape, generator)
    read = layout.read_rows(rows)
    basis = refreshed_basis(read, layout.shape, group, side, generator, previous, context.warn,
                            check_read=rows is not None)
    basis = store_basis(state, basis, group["basis_bits"])
    record_refresh(state, group, step, previous, basis, side)
    return basis, previous


def step_projected_weight(
    layout: WeightLayout, state: dict[str, Any], group: dict[str, Any], context: StepContext
) -> None:
    """One GaLore+ step of a matrix or a stack of them; a step with non-finite values changes nothing but t (see
    module docs)."""
    step = state.get("step", 0) + 1
    source = UPDATE_RULES[group["update_rule"]].gradient_source
    if source is not None:
        layout = source(layout, state)
    side = projection_side(layout.shape, group["proj_type"], group["projector"])
    basis, previous = step_basis(layout, state, group, side, step, context)
    local_basis = layout.local_basis(basis, side)
    grad = layout.gradient()
    local_low_rank = project(grad, local_basis, side)
    low_rank = layout.reduce_low_rank(local_low_rank, side)
    finish_step(layout, state, group, context, step, side, basis, previous, low_rank, grad=grad,
                local_low_rank=local_low_rank)


def accumulate_projected_gradient(
    layout: WeightLayout, state: dict[str, Any], group: dict[str, Any], context: StepContext,
    accumulator: Accumulator | None, micro_batches: int,
) -> Accumulator:
    """Per-layer accumulation: add this micro-batch's gradient to the weight's accumulator (None: the first
    micro-batch of the update, which also refreshes the basis when one is due); ``micro_batches``: k, the
    accumulation steps (Fira's per-micro-batch terms are scaled by 1 / k); see :mod:`galore_plus.step.accumulate`."""
    step = state.get("step", 0) + 1
    side = projection_side(layout.shape, group["proj_type"], group["projector"])
    if accumulator is None:
        basis, previous = step_basis(layout, state, group, side, step, context)
    else:
        basis, previous = stored_basis(state, basis_shape(layout.shape, group["rank"], side)), accumulator.previous
    grad = layout.gradient()
    return add_micro_batch(accumulator, layout.weight(), grad, project(grad, basis, side), basis, side, previous,
                           state, group, step, micro_batches)


def step_accumulated_weight(
    layout: WeightLayout, state: dict[str, Any], group: dict[str, Any], context: StepContext, accumulator: Accumulator
) -> None:
    """The step at the boundary of per-layer accumulation, from the weight's accumulator instead of a gradient."""
    step = state.get("step", 0) + 1
    side = projection_side(layout.shape, group["proj_type"], group["projector"])
    basis = stored_basis(state, basis_shape(layout.shape, group["rank"], side))
    finish_step(layout, state, group, context, step, side, basis, accumulator.previous,
                accumulator.clipped_low_rank(), accumulator=accumulator)


def finish_step(
    layout: WeightLayout, state: dict[str, Any], group: dict[str, Any], context: StepContext, step: int, side: Side,
    basis: Tensor, previous: Tensor | None, low_rank: Tensor, grad: Tensor | None = None,
    local_low_rank: Tensor | None = None, accumulator: Accumulator | None = None,
) -> None:
    """The step from R = ``low_rank`` on: moments, direction, finiteness, residual, update rule.

    The full-size terms read ``grad`` (an ordinary step) or, at per-layer accumulation's boundary
    (``grad`` None), ``accumulator``.
    """
    local_basis = layout.local_basis(basis, side)
    stored = moments_8bit.load_moments(state) if context.optim_bits == 8 else {}
    if "exp_avg" not in state:
        state["exp_avg"] = layout.moment_zeros(low_rank, side)
        state["exp_avg_sq"] = layout.moment_zeros(low_rank, side)
    moments = layout.local(state["exp_avg"]), layout.local(state["exp_avg_sq"])
    if previous is not None:
        for hook in REFRESH_HOOKS:
            hook(*moments, previous, basis, side, state, group)
    before = [moment.clone() for moment in moments]
    state["step"] = step
    beta1, beta2 = group["betas"]
    rule = UPDATE_RULES[group["update_rule"]]
    direction = rule.direction(low_rank, *moments, step, beta1, beta2, group["eps"])
    # R need not be checked: beta2 < 1, so a non-finite R makes V = b2 V + (1 - b2) R^2 non-finite
    finite = layout.all_ranks(matrix_finite(direction, moments[1]))
    for moment, old in zip(moments, before):
        torch.where(finite, moment, old, out=moment)
    weight = layout.weight()
    grad_at = accumulator.clipped_residual_grad() if accumulator is not None else None
    residual = residual_update(weight, grad, low_rank, direction, basis, side, state, group, step, finite,
                               grad_at=grad_at)
    inputs = UpdateInputs(weight, layout.shape, grad, low_rank, direction, local_basis, side, step,
                          finite, local_low_rank, layout.total, accumulator)
    rule.apply(inputs, state, group)
    if residual is not None:
        write_residual(weight, residual)
    context.skipped.add(context.label, finite if residual is None else residual.finite)
    if context.optim_bits == 8:
        moments_8bit.store_moments(state, stored, finite)
