"""The ``cross_head`` projector: right singular vectors of the rows of one (or a few) pseudo-randomly chosen attention
heads; the basis is shared by every head (GaLore+ section 4.1)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..step.shapes import Shape, Side
from .base import STORED_BASIS_KEYS, Projector, warm_previous
from .randomized import SKETCH_KEYS, randomized_basis
from .svd import svd_basis

HEAD_PROJECTORS = ("svd", "randomized")


def chosen_heads(num_heads: int, count: int, generator: torch.Generator) -> Tensor:
    """``count`` distinct head indices drawn pseudo-randomly, as a sorted CPU tensor."""
    return torch.randperm(num_heads, generator=generator)[:count].sort().values

def cross_head_choice(
    num_heads: int, head_dim: int, rank: int, generator: torch.Generator, count: int | None = None
) -> Tensor:
    """The heads whose rows a cross-head basis of ``rank`` directions is computed from.

    ``count`` of them (the group's ``cross_head_heads``), at most ``num_heads``; None takes
    ceil(rank / head_dim), the fewest whose rows can hold ``rank`` directions. Drawn from a fresh
    generator with ``generator``'s seed, so ``generator`` itself is not advanced.
    """
    count = math.ceil(rank / head_dim) if count is None else min(count, num_heads)
    return chosen_heads(num_heads, count, torch.Generator().manual_seed(generator.initial_seed()))

def head_rows(grad: Tensor, num_heads: int, heads: Tensor) -> Tensor:
    """The gradient rows of the given heads of a (num_heads * head_dim, n) weight, stacked."""
    head_dim = grad.shape[0] // num_heads
    return grad.view(num_heads, head_dim, grad.shape[1])[heads.to(grad.device)].reshape(-1, grad.shape[1])

def head_row_indices(heads: Tensor, head_dim: int) -> Tensor:
    """Row indices (CPU int64) of the given heads, in head order: the rows :func:`head_rows` stacks."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)

def shared_head_basis(
    rows: Tensor,
    rank: int,
    generator: torch.Generator,
    head_projector: str = "svd",
    oversample: int = 8,
    power_iters: int = 2,
    previous: Tensor | None = None,
) -> Tensor:
    """Input-side basis (rank, n) from the stacked rows of the chosen heads."""
    if head_projector == "svd":
        return svd_basis(rows, rank, "right")
    return randomized_basis(rows, rank, "right", generator, oversample, power_iters, previous)

def group_num_heads(group: dict, rows: int) -> int:
    """Heads of a ``cross_head`` weight with ``rows`` rows, from the group's ``num_heads`` or ``head_dim``."""
    return rows // group["head_dim"] if group.get("head_dim") else group["num_heads"]

def _cross_head_rows(group: dict, shape: Shape, generator: torch.Generator) -> Tensor:
    num_heads = group_num_heads(group, shape[0])
    head_dim = shape[0] // num_heads
    heads = cross_head_choice(num_heads, head_dim, group["rank"], generator, group.get("cross_head_heads"))
    return head_row_indices(heads, head_dim)

def _cross_head(
    read: Tensor, shape: Shape, group: dict, side: Side, generator: torch.Generator, previous: Tensor | None
) -> Tensor:
    return shared_head_basis(read, group["rank"], generator, group["head_projector"], group["oversample"],
                             group["power_iters"], warm_previous(group, previous))


# Fira's full-rank residual by default, as for ``randomized`` (see there).
CROSS_HEAD = Projector(_cross_head, rows=_cross_head_rows, side="right",
                       keys=("num_heads", "head_dim", "head_projector", "cross_head_heads") + SKETCH_KEYS
                       + STORED_BASIS_KEYS, full_rank_residual=True, stacks=False)
