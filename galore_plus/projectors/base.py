"""What a projector is: a :class:`Projector`, one entry of :data:`galore_plus.projectors.PROJECTORS`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from ..group_keys import GroupCheck, GroupKey, WeightCheck, boolean, choice, no_check
from ..state.basis_4bit import BASIS_BITS_KEY
from ..state.tensors import StateTensor
from ..step.shapes import Shape, Side
from ..step.stacks import Generators

BasisFunction = Callable[[Tensor, Shape, dict, Side, Generators, "Tensor | None"], Tensor]
RowsFunction = Callable[[dict, Shape, torch.Generator], "Tensor | None"]


def every_row(group: dict, shape: Shape, generator: torch.Generator) -> None:
    """The rows read by a projector that needs the whole gradient: all of them (None)."""
    return None


def no_row(group: dict, shape: Shape, generator: torch.Generator) -> Tensor:
    """The rows read by a stored basis that does not depend on the gradient: none (``read`` is then (0, n))."""
    return torch.empty(0, dtype=torch.int64)


@dataclass(frozen=True)
class Projector:
    """One entry of :data:`~galore_plus.projectors.PROJECTORS`; it describes itself, so validation, the memory
    estimator and the checkpoint check read it and never name it.

    * ``basis(read, shape, group, side, generator, previous)``: the float32 basis of a weight of
      global ``shape`` (m, n) or (E, m, n), from ``read``, the float32 gradient rows given by ``rows``
      (the whole gradient when ``rows`` gives None); ``previous`` is the last basis when the
      group's ``warm_start`` is on, else None. A stack's ``generator`` is a list, one per expert.
    * ``rows(group, shape, generator)``: the gradient rows the basis reads, as CPU int64 indices
      in the order ``read`` stacks them, or None for every row (an empty index: a basis that reads no gradient,
      so a row-sharded weight gathers no values at a refresh, :func:`no_row`). It must not advance ``generator``.
    * ``side``: the side it always projects, or None to follow the group's ``proj_type``.
    * ``stores_basis``: False for a projector whose basis is regenerated every step from the
      seeded generator (``read`` is then None and nothing is stored in the state).
    * ``keys``: the group keys it reads besides those every projected step reads
      (:data:`galore_plus.group_options.STEP_KEYS`), with their defaults and checks; a group of this
      projector may set no other projector key (validation derives what it refuses, and whom to name, from this).
    * ``rule_defaults``: defaults it gives to keys its group's update rule reads, where the group does not set
      them (the GaLore+ projectors turn on Fira's ``full_rank_residual``).
    * ``state``: tensors it keeps in a weight's state besides the basis, the moments and the rule's.
    * ``check_group(group, fail)``, ``check_weight(group, shape, where, fail)``: checks across its keys, and of
      each weight's stepped shape (``where`` describes the weight in messages).
    * ``stacks``: whether it computes the bases of a stack of matrices (E, m, n), batched.
    * ``accumulation_refusal``: why it cannot run with per-layer accumulation, or None when it can.
    """

    basis: BasisFunction
    rows: RowsFunction = every_row
    side: Side | None = None
    stores_basis: bool = True
    keys: dict[str, GroupKey] = field(default_factory=dict)
    rule_defaults: dict[str, Any] = field(default_factory=dict)
    state: dict[str, StateTensor] = field(default_factory=dict)
    check_group: GroupCheck = no_check
    check_weight: WeightCheck = no_check
    stacks: bool = True
    accumulation_refusal: str | None = None


def warm_previous(group: dict, previous: Tensor | None) -> Tensor | None:
    """The previous basis when the group's ``warm_start`` is on (a warm start of an iterative projector), else None."""
    return previous if group["warm_start"] else None


PROJ_TYPES = ("std", "reverse_std", "left", "right")
# GaLore's choice of the projected side, for projectors without a fixed one.
PROJ_TYPE_KEY = {"proj_type": GroupKey("std", choice(PROJ_TYPES))}
# Keys of a projector that keeps its basis between refreshes: its 4-bit storage and the moment transfer at a refresh.
STORED_BASIS_KEYS = {**BASIS_BITS_KEY, "moment_transfer": GroupKey(False, boolean)}
