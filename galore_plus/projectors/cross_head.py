"""The ``cross_head`` projector: right singular vectors of the rows of one (or a few) pseudo-randomly chosen attention
heads; the basis is shared by every head (GaLore+ section 4.1)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..step.shapes import Shape, Side
from ..group_keys import Fail, GroupKey, choice, integer, optional
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


def check_heads(group: dict, fail: Fail) -> None:
    """Exactly one of ``num_heads`` and ``head_dim``, an int >= 1."""
    num_heads, head_dim = group["num_heads"], group["head_dim"]
    if num_heads is None and head_dim is None:
        fail("num_heads", f"projector {group['projector']!r} needs 'num_heads' (or 'head_dim') to split rows into heads")
    if num_heads is not None and head_dim is not None:
        fail("head_dim", "give either 'num_heads' or 'head_dim', not both")
    key = "num_heads" if num_heads is not None else "head_dim"
    problem = integer(1)(group[key])
    if problem is not None:
        fail(key, problem[1], problem[0])


def check_head_rows(group: dict, shape: Shape, where: str, fail: Fail) -> None:
    """The rank fits the input size and the rows, the heads divide the rows, the chosen heads hold rank rows."""
    m, n = shape[-2:]
    rank = group["rank"]
    if rank > n or rank > m:
        fail("rank", f"{rank} exceeds the input size n = {n} (or rows m = {m}) of {where}")
    if group["head_dim"] is not None:
        if m % group["head_dim"]:
            fail("head_dim", f"{group['head_dim']} does not divide the {m} rows of {where}")
        num_heads, head_dim = m // group["head_dim"], group["head_dim"]
    elif m % group["num_heads"]:
        fail("num_heads", f"{group['num_heads']} does not divide the {m} rows of {where}")
    else:
        num_heads, head_dim = group["num_heads"], m // group["num_heads"]
    heads = group["cross_head_heads"]
    if heads is not None and min(heads, num_heads) * head_dim < rank:
        fail("cross_head_heads", f"{heads} heads of {head_dim} rows of {where} give fewer rows than rank = {rank}")


HEAD_KEYS = {
    "num_heads": GroupKey(None), "head_dim": GroupKey(None),   # checked together by check_heads
    "head_projector": GroupKey("svd", choice(HEAD_PROJECTORS)),
    "cross_head_heads": GroupKey(None, optional(integer(1))),
}
# Fira's full-rank residual by default, as for ``randomized`` (see there).
CROSS_HEAD = Projector(_cross_head, rows=_cross_head_rows, side="right",
                       keys={**HEAD_KEYS, **SKETCH_KEYS, **STORED_BASIS_KEYS}, rule_defaults={"full_rank_residual": True},
                       check_group=check_heads, check_weight=check_head_rows, stacks=False)
