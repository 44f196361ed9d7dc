"""What a table entry declares of the state it keeps: a :class:`StateTensor` per state key.

The memory estimator counts these tensors and the checkpoint check compares a loaded state with their
shapes, so an entry with state of its own describes it once, where it is written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..step.shapes import Shape, Side

ShapeOf = Callable[[Shape, dict, Side], Shape]
DtypeOf = Callable[[Shape, dict], torch.dtype]
KeptBy = Callable[[dict, int, bool], bool]


def always(group: dict, optim_bits: int, accumulation: bool) -> bool:
    """Kept by every weight of every group."""
    return True


@dataclass(frozen=True)
class StateTensor:
    """A tensor one projected weight keeps in ``optimizer.state[p]``.

    * ``shape(shape, group, side)``: its shape, from the weight's stepped shape (m, n) or (E, m, n), the group
      (``rank`` and the entry's keys, defaults filled) and the projected side;
    * ``dtype``: its dtype, or ``dtype(shape, group)`` where it depends on them;
    * ``kept(group, optim_bits, accumulation)``: whether a weight of this group keeps it once it has stepped
      (after the residual's warm-up; ``accumulation``: per-layer accumulation is on).
    """

    shape: ShapeOf
    dtype: torch.dtype | DtypeOf = torch.float32
    kept: KeptBy = always

    def dtype_for(self, shape: Shape, group: dict) -> torch.dtype:
        """The dtype of this tensor for a weight of stepped ``shape`` in ``group``."""
        return self.dtype if isinstance(self.dtype, torch.dtype) else self.dtype(shape, group)

    def nbytes(self, shape: Shape, group: dict, side: Side) -> int:
        """Bytes of this tensor for a weight of stepped ``shape`` in ``group``."""
        return math.prod(self.shape(shape, group, side)) * self.dtype_for(shape, group).itemsize


def per_matrix_scalar(shape: Shape, group: dict, side: Side) -> Shape:
    """One value per matrix: 0-d for a matrix (m, n), (E, 1, 1) for a stack (E, m, n)."""
    return (*shape[:-2], 1, 1) if len(shape) > 2 else ()


def state_bytes(tensors: dict[str, StateTensor], shape: Shape, group: dict[str, Any], side: Side, optim_bits: int,
                accumulation: bool) -> int:
    """Bytes of the tensors of ``tensors`` that a weight of ``group`` keeps."""
    return sum(tensor.nbytes(shape, group, side) for tensor in tensors.values()
               if tensor.kept(group, optim_bits, accumulation))
