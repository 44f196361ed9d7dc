"""What a projector is: a :class:`Projector`, one entry of :data:`galore_plus.projectors.PROJECTORS`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ..step.shapes import Shape, Side
from ..step.stacks import Generators

BasisFunction = Callable[[Tensor, Shape, dict, Side, Generators, "Tensor | None"], Tensor]

RowsFunction = Callable[[dict, Shape, torch.Generator], "Tensor | None"]

def every_row(group: dict, shape: Shape, generator: torch.Generator) -> None:
    """The rows read by a projector that needs the whole gradient: all of them (None)."""
    return None

@dataclass(frozen=True)
class Projector:
    """One entry of :data:`PROJECTORS`.

    * ``basis(read, shape, group, side, generator, previous)``: the float32 basis of a weight of
      global ``shape`` (m, n) or (E, m, n), from ``read``, the float32 gradient rows given by ``rows``
      (the whole gradient when ``rows`` gives None); ``previous`` is the last basis when the
      group's ``warm_start`` is on, else None. A stack's ``generator`` is a list, one per expert.
    * ``rows(group, shape, generator)``: the gradient rows the basis reads, as CPU int64 indices
      in the order ``read`` stacks them, or None for every row. It must not advance ``generator``.
    * ``side``: the side it always projects, or None to follow the group's ``proj_type``.
    * ``stores_basis``: False for a projector whose basis is regenerated every step from the
      seeded generator (``read`` is then None and nothing is stored in the state).
    * ``keys``: the group keys it reads besides those every projected step reads
      (:data:`galore_plus.group_options.STEP_KEYS`); a group of this projector may set no other
      projector key (validation derives what it refuses, and whom to name, from this).
    * ``full_rank_residual``: whether its groups get Fira's full-rank residual by default (where
      the update rule reads ``full_rank_residual``).
    * ``stacks``: whether it computes the bases of a stack of matrices (E, m, n), batched.
    """

    basis: BasisFunction
    rows: RowsFunction = every_row
    side: Side | None = None
    stores_basis: bool = True
    keys: tuple[str, ...] = ()
    full_rank_residual: bool = False
    stacks: bool = True

def warm_previous(group: dict, previous: Tensor | None) -> Tensor | None:
    """The previous basis when the group's ``warm_start`` is on (a warm start of an iterative projector), else None."""
    return previous if group["warm_start"] else None


# Keys of a projector that keeps its basis between refreshes: its 4-bit storage and the moment transfer at a refresh.
# Keys of a projector that keeps its basis between refreshes: its 4-bit storage and the moment transfer at a refresh.
STORED_BASIS_KEYS = ("basis_bits", "moment_transfer")
