"""The ``svd`` projector: the top-r singular vectors of the gradient by ``torch.linalg.svd`` (GaLore)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..step.shapes import Shape, Side
from ..step.stacks import Generators
from .base import PROJ_TYPE_KEY, STORED_BASIS_KEYS, Projector


def svd_basis(grad: Tensor, rank: int, side: Side) -> Tensor:
    """Top-``rank`` singular vectors of ``grad`` (of each matrix of a stack) by a full (thin) SVD."""
    u, _, vh = torch.linalg.svd(grad, full_matrices=False)
    return u[..., :rank].contiguous() if side == "left" else vh[..., :rank, :].contiguous()


def _svd(read: Tensor, shape: Shape, group: dict, side: Side, generator: Generators, previous: Tensor | None) -> Tensor:
    return svd_basis(read, group["rank"], side)


SVD = Projector(_svd, keys={**PROJ_TYPE_KEY, **STORED_BASIS_KEYS})
