"""The residual's part of one optimizer step: when I is chosen, the residual state, and writing p at I.

State of a weight with a residual (plain tensors and ints in ``optimizer.state[p]``):

* ``residual_row_ptr`` (m + 1,) and ``residual_col`` (|I|,): the index set I in CSR form;
* ``residual_exp_avg``, ``residual_exp_avg_sq`` (|I|,) float32: M_I, V_I ("exact") or dM, dV ("paper");
* ``residual_step``: c, the number of steps the residual has been applied (a skipped step counts,
  as it does in t).

A step whose low-rank part or residual values or moments are not finite leaves the residual moments
and the weight at I unchanged, decided on the device (``torch.where``), without a host read.
"""

from __future__ import annotations

from numbers import Real
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..group_keys import GroupKey, Problem, choice, integer
from ..kernels.dispatch import residual_values
from ..rules.auto_scale import residual_scale
from ..state.tensors import StateTensor
from ..step.finite import all_finite
from ..step.shapes import Shape, Side
from .index import column_dtype, flat_index, residual_count, row_offset_dtype, select_residual_index
from .values import RESIDUAL_MODES, gather_flat, residual_values_at, scatter_flat


def ratio_problem(value: Any) -> Problem:
    """Why ``value`` is not a valid ``residual_ratio`` (a number in [0, 1)), or None."""
    if isinstance(value, bool) or not isinstance(value, Real):
        return TypeError, f"must be a number, got {value!r}"
    if not 0.0 <= value < 1.0:
        return ValueError, f"must be in [0, 1), got {value!r}"
    return None


# The keys of the sparse residual, read by the update rules it composes with.
RESIDUAL_KEYS: dict[str, GroupKey] = {
    "residual_ratio": GroupKey(0.0, ratio_problem),
    "residual_warmup": GroupKey(10, integer(0)),
    "residual_mode": GroupKey("exact", choice(RESIDUAL_MODES)),
}


def _count(shape: Shape, group: dict) -> int:
    return residual_count(group["residual_ratio"], shape[-2:])


def _entries(shape: Shape, group: dict, side: Side) -> Shape:
    return (_count(shape, group),)


def _has_residual(group: dict, optim_bits: int, accumulation: bool) -> bool:
    return group["residual_ratio"] > 0


# The residual's state (matrices only; expert stacks refuse a residual).
RESIDUAL_STATE: dict[str, StateTensor] = {
    "residual_row_ptr": StateTensor(lambda shape, group, side: (shape[-2] + 1,),
                                    lambda shape, group: row_offset_dtype(_count(shape, group)), _has_residual),
    "residual_col": StateTensor(_entries, lambda shape, group: column_dtype(shape[-1]), _has_residual),
    "residual_exp_avg": StateTensor(_entries, kept=_has_residual),
    "residual_exp_avg_sq": StateTensor(_entries, kept=_has_residual),
}


class ResidualWrite(NamedTuple):
    """What to write after the low-rank update: p at the flat positions ``index`` <- ``values``.

    ``finite`` (0-d bool) is False when the step was skipped: ``values`` are then p's own values.
    """

    index: Tensor
    values: Tensor
    finite: Tensor


def residual_update(
    param: Tensor, grad: Tensor | None, low_rank: Tensor, direction: Tensor, basis: Tensor, side: Side,
    state: dict[str, Any], group: dict[str, Any], step: int, finite: Tensor, grad_at: Tensor | None = None,
) -> ResidualWrite | None:
    """Run the residual part of step ``step`` (call after the low-rank moments are updated).

    Chooses I at the end of step max(k, 1) with k = ``residual_warmup``; for t > k returns the
    write to make after the low-rank update, else None. ``finite`` (0-d bool) says whether the
    low-rank part of the step is kept; the residual is kept only if it is and its own values and
    moments are finite. ``grad_at``: instead of ``grad`` (then None), the gradient's float32 values at I
    (per-layer accumulation's sum over micro-batches; the torch reference runs on any device).
    """
    shape = tuple(param.shape)
    count = residual_count(group["residual_ratio"], shape)
    if count == 0:
        return None
    if "residual_col" not in state:
        if step < group["residual_warmup"]:
            return None
        row_ptr, col = select_residual_index(basis, state["exp_avg"], side, shape, count)
        state["residual_row_ptr"], state["residual_col"] = row_ptr, col
        state["residual_exp_avg"] = torch.zeros(col.numel(), device=param.device)
        state["residual_exp_avg_sq"] = torch.zeros(col.numel(), device=param.device)
        state["residual_step"] = 0
    if step <= group["residual_warmup"]:
        return None
    state["residual_step"] += 1
    index = flat_index(state["residual_row_ptr"], state["residual_col"], shape[1])
    moments = state["residual_exp_avg"], state["residual_exp_avg_sq"]
    before = [moment.clone() for moment in moments]
    beta1, beta2 = group["betas"]
    compute, source = (residual_values, grad) if grad_at is None else (residual_values_at, grad_at)
    values = compute(
        param, source, index, *moments, basis, side, low_rank, state["exp_avg_sq"], direction,
        group["residual_mode"], step, state["residual_step"], beta1, beta2, group["eps"],
        group["lr"], group["weight_decay"], residual_scale(group["scale"]),
    )
    kept = finite & all_finite(values, *moments)
    for moment, old in zip(moments, before):
        moment.copy_(torch.where(kept, moment, old))
    return ResidualWrite(index, torch.where(kept, values, gather_flat(param, index).float()), kept)


def write_residual(param: Tensor, write: ResidualWrite) -> None:
    """Overwrite p at I with the new values (rounded once to the weight's dtype)."""
    scatter_flat(param, write.index, write.values.to(param.dtype))
