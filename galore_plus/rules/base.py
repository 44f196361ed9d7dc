"""What an update rule is: an :class:`UpdateRule`, one entry of :data:`galore_plus.rules.UPDATE_RULES`, and the
:class:`UpdateInputs` it reads."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from torch import Tensor

from ..group_keys import GroupCheck, GroupKey, no_check
from ..kernels.dispatch import lowrank_adam_direction
from ..state.tensors import StateTensor
from ..step.accumulate import Accumulator
from ..step.layouts import single_process_total
from ..step.shapes import Shape, Side
from .norms import Total


@dataclass(frozen=True)
class UpdateInputs:
    """One weight's step, as an update rule sees it (every tensor is this process's rows).

    ``weight``: the parameter (transposed to (m, n) for ``transposed`` groups), any float dtype;
    ``shape``: (m, n) of the whole weight (a sharded weight's ``weight`` holds some of its rows), or
    (E, m, n) for a stack of matrices, whose every tensor below has the leading dimension E and whose
    norms and limiter states are one per expert, (E, 1, 1);
    ``grad``: its gradient in the parameter's dtype (no float32 copy of a bfloat16 one: a rule
    reads it a block of rows at a time, :mod:`galore_plus.step.row_blocks`; may hold NaN/Inf: then
    ``finite`` is False); ``low_rank``: R = P^T G | G Q^T (summed over ranks on the left side); ``direction``: N, the rule's Adam
    direction of R (when ``finite`` is False it may hold NaN/Inf: a rule masks what it multiplies
    in); ``basis``: P (these rows) | Q; ``step``: t >= 1;
    ``finite``: a 0-d bool tensor on the weight's device, False when this step must leave the
    weight unchanged; ``local_low_rank``: this process's rows' part of R before the sum over ranks
    (P^T G of these rows on the left side; None: ``low_rank`` itself, as in a single process and on
    the right side); ``total``: the sum over processes of a tensor each computed from its own rows
    (the tensor itself in a single process; no host read); ``accumulated``: at the boundary of per-layer
    accumulation, the weight's :class:`~galore_plus.step.accumulate.Accumulator` (``grad`` is then None and
    ``low_rank`` the accumulated R; only the rules' terms :mod:`galore_plus.step.accumulate` defines are allowed).
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
    """One entry of :data:`~galore_plus.rules.UPDATE_RULES`; it describes itself, so validation, the memory
    estimator and the checkpoint check read it and never name it.

    * ``apply(inputs, state, group)``: writes ``inputs.weight`` (see :mod:`galore_plus.rules`);
    * ``direction(low_rank, exp_avg, exp_avg_sq, step, beta1, beta2, eps)``: updates the two
      moments in place with this step's low-rank gradient R and returns the direction N that
      ``apply`` reads as ``inputs.direction`` (the step also checks that N is finite).
    * ``keys``: the group keys it (or what it composes with, the sparse residual) reads besides
      those every projected step reads, with their defaults and checks; a group with this rule may set no other
      rule key.
    * ``state``: the tensors it keeps in a weight's state (written by ``apply``), with their shapes and dtypes.
    * ``check_group(group, fail)``: checks across keys (``scale`` as this rule reads it).
    * ``accumulation_refusal``: why it cannot run with per-layer accumulation, or None when it can.
    * ``gradient_source(layout, state)``: where the step reads its gradient instead of the weight's layout (a
      layout of the same weight: LDAdam's error feedback adds its buffer), or None.
    """

    apply: ApplyFunction
    direction: DirectionFunction = lowrank_adam_direction
    keys: dict[str, GroupKey] = field(default_factory=dict)
    state: dict[str, StateTensor] = field(default_factory=dict)
    check_group: GroupCheck = no_check
    accumulation_refusal: str | None = None
    gradient_source: Callable[[Any, dict[str, Any]], Any] | None = None


def require_whole_weight(rule: str, local_shape: tuple[int, ...], shape: Shape, reason: str) -> None:
    """Raise NotImplementedError, naming ``rule`` and ``reason``, unless this process holds every row of the weight
    (``local_shape`` is ``shape``; FSDP2 row shards hold some)."""
    if tuple(local_shape) != tuple(shape):
        raise NotImplementedError(f"update_rule {rule!r} is not implemented for FSDP2 row shards ({reason}; rows "
                                  f"{tuple(local_shape)} of {tuple(shape)}); use update_rule 'galore'")
