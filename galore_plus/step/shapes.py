"""The shapes a projected step works with: the projected side, and the stepped shape of a weight."""

from __future__ import annotations

import math
from typing import Literal

from torch import Tensor

Side = Literal["left", "right"]
Shape = tuple[int, ...]  # (m, n), or (E, m, n) for a stack of E matrices


def basis_shape(shape: Shape, rank: int, side: Side) -> Shape:
    """Shape of the basis of an (m, n) weight: P (m, rank) on the left side, Q (rank, n) on the right; of an
    (E, m, n) stack: (E, m, rank) or (E, rank, n)."""
    *batch, m, n = shape
    return (*batch, m, rank) if side == "left" else (*batch, rank, n)


def low_rank_shape(shape: Shape, rank: int, side: Side) -> Shape:
    """Shape of the low-rank gradient R (and of its moments): (rank, n) on the left side, (m, rank) on the right."""
    *batch, m, n = shape
    return (*batch, rank, n) if side == "left" else (*batch, m, rank)


def stepped_shape(param: Tensor, transposed: bool) -> Shape:
    """The shape the optimizer steps: (m, n) of a matrix (its transpose for a ``transposed`` group, GPT-2 Conv1D),
    (E, m, n) of a stack of E matrices (each transposed for ``transposed``), and (out, in kh kw) of a
    convolution kernel (out, in, kh, kw)."""
    if param.dim() == 4:
        return param.shape[0], math.prod(param.shape[1:])
    *batch, rows, columns = param.shape
    return (*batch, columns, rows) if transposed else (*batch, rows, columns)
