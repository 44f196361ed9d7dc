"""Projector strategies: how the basis of a gradient's low-rank subspace is found (orthonormal but for ``random``).

A basis is a plain float32 tensor. Its shape tells the side it projects:

* ``"left"``  (output side, rows):     P of shape (m, r), low-rank gradient R = P^T G (r, n)
* ``"right"`` (input side, columns):   Q of shape (r, n), low-rank gradient R = G Q^T (m, r)

A stack of E independent matrices G (E, m, n) (:mod:`galore_plus.stacks`) has a stack of bases,
(E, m, r) or (E, r, n), computed batched by the same functions; ``cross_head`` takes matrices only.

Four strategies give it, registered by name in :data:`PROJECTORS` (a group's ``projector`` key):

* ``svd``         top-r singular vectors by ``torch.linalg.svd`` (GaLore).
* ``randomized``  Halko-Martinsson-Tropp randomized subspace iteration, optionally warm-started
                  from the previous basis.
* ``cross_head``  right singular vectors of the rows of one (or a few) pseudo-randomly chosen
                  attention heads; the basis is shared by every head (GaLore+ section 4.1).
* ``random``      a Gaussian basis with N(0, 1/r) entries, independent of the gradient and never
                  stored: regenerated at every step from the seeded generator (APOLLO; see
                  :mod:`galore_plus.random_basis`). It is not orthonormal.

Every random choice draws from a ``torch.Generator`` made by :func:`basis_generator` (a list of
them, one per expert, for a stack: :func:`basis_generators`), never from torch's global RNG.

A registry entry is a :class:`Projector`: a basis function of one signature, the gradient rows it
reads (so a row-sharded weight gathers only those), its fixed side if it has one, and whether the
basis is stored in the state or regenerated every step from the seeded generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import Tensor

from .random_basis import gaussian_basis
from .row_blocks import experts_of, widened_dtype, widened_row_blocks
from .stacks import Generators, add_product_, expert_seed, seeded_normal, stack_size

Side = Literal["left", "right"]

PROJ_TYPES = ("std", "reverse_std", "left", "right")
HEAD_PROJECTORS = ("svd", "randomized")


def projection_side(shape: tuple[int, ...], proj_type: str, projector: str) -> Side:
    """Which side of an (m, n) weight (or of each matrix of an (E, m, n) stack) is projected, following GaLore's
    ``proj_type``.

    ``std`` projects the smaller dimension (right when m >= n), ``reverse_std`` the larger one.
    A projector with a fixed side overrides it (``cross_head`` always projects the input side so
    that one basis serves every head).
    """
    fixed = PROJECTORS[projector].side
    if fixed is not None:
        return fixed
    m, n = shape[-2:]
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    return "left" if proj_type == "left" else "right"


def basis_generator(seed: int, param_index: int, refresh_index: int, device: torch.device) -> torch.Generator:
    """A generator seeded only from (seed, parameter position, refresh count).

    Every process of a data-parallel job derives the same numbers, and resuming from a
    checkpoint needs no saved RNG state.
    """
    mixed = ((seed * 1_000_003 + param_index) * 1_000_033 + refresh_index) % (2**63 - 1)
    generator = torch.Generator(device=device)
    generator.manual_seed(mixed)
    return generator


def basis_generators(seed: int, param_index: int, refresh_index: int, shape: tuple[int, ...],
                     device: torch.device) -> Generators:
    """The generator of a weight of stepped ``shape``: :func:`basis_generator` for a matrix (m, n), one per
    expert for a stack (E, m, n), expert e's from seed :func:`~galore_plus.stacks.expert_seed` (seed, e)."""
    if len(shape) == 2:
        return basis_generator(seed, param_index, refresh_index, device)
    return [basis_generator(expert_seed(seed, expert), param_index, refresh_index, device)
            for expert in range(stack_size(shape))]


def project(grad: Tensor, basis: Tensor, side: Side, block_values: int | None = None) -> Tensor:
    """Low-rank gradient: P^T G for the left side, G Q^T for the right side.

    A half-precision (bfloat16, float16) gradient is converted to float32 a block of rows at a time
    (:func:`~galore_plus.row_blocks.widened_row_blocks`, about ``block_values`` values), never as a
    whole, and multiplied with the float32 basis: right side, the rows of G Q^T of those rows; left
    side, P^T G summed over blocks of rows of G and P (contiguous rows of G, not strided columns).
    A stack G (E, m, n) with bases (E, m, r) | (E, r, n) gives (E, r, n) | (E, m, r), in the blocks of
    :func:`~galore_plus.row_blocks.row_slices` (rows of one expert, or several whole experts at once).
    """
    if widened_dtype(grad.dtype) == grad.dtype:
        return basis.mT @ grad if side == "left" else grad @ basis.mT
    *batch, m, n = grad.shape
    if side == "left":
        low_rank = torch.zeros(*batch, basis.shape[-1], n, dtype=torch.float32, device=grad.device)
        for block, values in widened_row_blocks(grad, block_values):
            add_product_(low_rank[experts_of(block)], basis[block].mT, values)
        return low_rank
    low_rank = torch.empty(*batch, m, basis.shape[-2], dtype=torch.float32, device=grad.device)
    for block, values in widened_row_blocks(grad, block_values):
        product = torch.mm if values.dim() == 2 else torch.bmm
        product(values, basis[experts_of(block)].mT, out=low_rank[block])
    return low_rank


def project_back(low_rank: Tensor, basis: Tensor, side: Side) -> Tensor:
    """Full-size matrix (or stack) of a low-rank one: P N for the left side, N Q for the right side."""
    return basis @ low_rank if side == "left" else low_rank @ basis


def svd_basis(grad: Tensor, rank: int, side: Side) -> Tensor:
    """Top-``rank`` singular vectors of ``grad`` (of each matrix of a stack) by a full (thin) SVD."""
    u, _, vh = torch.linalg.svd(grad, full_matrices=False)
    return u[..., :rank].contiguous() if side == "left" else vh[..., :rank, :].contiguous()


def left_singular_vectors(columns: Tensor) -> Tensor:
    """Left singular vectors of a tall (m, k) matrix, largest first, from its k x k Gram matrix.

    The Gram matrix and its eigendecomposition are float64, so singular values down to 1e-6 of the
    largest keep float32-orthonormal vectors; this costs two tall-skinny products where a
    Householder QR or SVD of the tall matrix is several times slower on a CPU. A numerically
    rank-deficient matrix falls back to ``torch.linalg.svd`` (in a stack (E, m, k), only the matrices
    that are; one host read decides whether any is).
    """
    wide = columns.double()
    eigenvalues, eigenvectors = torch.linalg.eigh(wide.mT @ wide)
    eigenvalues, eigenvectors = eigenvalues.flip(-1), eigenvectors.flip(-1)
    vectors = (wide @ (eigenvectors / eigenvalues.sqrt().unsqueeze(-2))).to(columns.dtype)
    usable = eigenvalues[..., -1] > eigenvalues[..., 0] * 1e-12
    if columns.dim() == 2:
        return vectors if bool(usable) else torch.linalg.svd(columns, full_matrices=False)[0]
    if bool(usable.all()):
        return vectors
    return torch.where(usable[:, None, None], vectors, torch.linalg.svd(columns, full_matrices=False)[0])


def _left_randomized(
    a: Tensor, rank: int, oversample: int, power_iters: int, generator: Generators, previous: Tensor | None
) -> Tensor:
    """Top-``rank`` left singular vectors of ``a`` (m, n), or of each matrix of a stack, by randomized subspace iteration."""
    m, n = a.shape[-2:]
    width = min(rank + oversample, m, n)
    if previous is not None:
        fresh = width - previous.shape[-1]
        omega = seeded_normal((n, fresh), generator, a.device, a.dtype)
        sketch = torch.cat([previous, a @ omega], dim=-1) if fresh > 0 else previous
    else:
        omega = seeded_normal((n, width), generator, a.device, a.dtype)
        sketch = a @ omega
    for _ in range(power_iters):
        sketch = a @ left_singular_vectors(a.mT @ left_singular_vectors(sketch))
    return left_singular_vectors(sketch)[..., :rank]


def randomized_basis(
    grad: Tensor,
    rank: int,
    side: Side,
    generator: Generators,
    oversample: int = 8,
    power_iters: int = 2,
    previous: Tensor | None = None,
) -> Tensor:
    """Top-``rank`` singular vectors of ``grad`` by Halko-Martinsson-Tropp subspace iteration.

    The sketch has ``rank + oversample`` columns. Each power iteration multiplies by G G^T with a
    QR re-orthonormalisation between the products; the final small SVD orders the directions.
    ``previous`` (a basis of the same side and rank) seeds the first ``rank`` sketch columns
    (warm start), so a slowly moving subspace is tracked with few iterations. A stack (E, m, n) takes
    one generator per expert (:func:`basis_generators`).
    """
    if side == "left":
        return _left_randomized(grad, rank, oversample, power_iters, generator, previous).contiguous()
    previous_left = previous.mT if previous is not None else None
    return _left_randomized(grad.mT, rank, oversample, power_iters, generator, previous_left).mT.contiguous()


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


def random_orthonormal_basis(shape: tuple[int, ...], rank: int, side: Side, generator: Generators,
                             device: torch.device) -> Tensor:
    """A random orthonormal basis (a stack of them for a stack): the fallback when no decomposition of the gradient
    is usable."""
    m, n = shape[-2:]
    size = m if side == "left" else n
    q, _ = torch.linalg.qr(seeded_normal((size, rank), generator, device))
    return q.contiguous() if side == "left" else q.mT.contiguous()


def group_num_heads(group: dict, rows: int) -> int:
    """Heads of a ``cross_head`` weight with ``rows`` rows, from the group's ``num_heads`` or ``head_dim``."""
    return rows // group["head_dim"] if group.get("head_dim") else group["num_heads"]


Shape = tuple[int, ...]  # (m, n), or (E, m, n) for a stack of E matrices
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


def _warm(group: dict, previous: Tensor | None) -> Tensor | None:
    return previous if group["warm_start"] else None


def _svd(read: Tensor, shape: Shape, group: dict, side: Side, generator: Generators, previous: Tensor | None) -> Tensor:
    return svd_basis(read, group["rank"], side)


def _randomized(
    read: Tensor, shape: Shape, group: dict, side: Side, generator: Generators, previous: Tensor | None
) -> Tensor:
    return randomized_basis(read, group["rank"], side, generator, group["oversample"], group["power_iters"],
                            _warm(group, previous))


def _cross_head_rows(group: dict, shape: Shape, generator: torch.Generator) -> Tensor:
    num_heads = group_num_heads(group, shape[0])
    head_dim = shape[0] // num_heads
    heads = cross_head_choice(num_heads, head_dim, group["rank"], generator, group.get("cross_head_heads"))
    return head_row_indices(heads, head_dim)


def _cross_head(
    read: Tensor, shape: Shape, group: dict, side: Side, generator: torch.Generator, previous: Tensor | None
) -> Tensor:
    return shared_head_basis(read, group["rank"], generator, group["head_projector"], group["oversample"],
                             group["power_iters"], _warm(group, previous))


def _random(read: None, shape: Shape, group: dict, side: Side, generator: Generators, previous: None) -> Tensor:
    return gaussian_basis(shape, group["rank"], side, generator)


# Keys of a projector that keeps its basis between refreshes: its 4-bit storage and the moment transfer at a refresh.
STORED_BASIS_KEYS = ("basis_bits", "moment_transfer")
SKETCH_KEYS = ("oversample", "power_iters", "warm_start")

# The GaLore+ projectors (randomized, cross_head) default to Fira's full-rank residual: on them it takes fine-tuning
# from +0.015 to -0.042 nats/byte against tuned AdamW (docs/levers.md); svd (GaLore) and random (APOLLO) keep their
# authors' updates.
PROJECTORS: dict[str, Projector] = {
    "svd": Projector(_svd, keys=("proj_type",) + STORED_BASIS_KEYS),
    "randomized": Projector(_randomized, keys=("proj_type",) + SKETCH_KEYS + STORED_BASIS_KEYS, full_rank_residual=True),
    "cross_head": Projector(_cross_head, rows=_cross_head_rows, side="right",
                            keys=("num_heads", "head_dim", "head_projector", "cross_head_heads") + SKETCH_KEYS
                            + STORED_BASIS_KEYS, full_rank_residual=True, stacks=False),
    "random": Projector(_random, stores_basis=False, keys=("proj_type",)),
}


def compute_basis(
    read: Tensor | None, shape: Shape, group: dict, side: Side, generator: Generators, previous: Tensor | None
) -> Tensor:
    """The basis chosen by the group's ``projector`` key (see :class:`Projector` for the arguments)."""
    return PROJECTORS[group["projector"]].basis(read, shape, group, side, generator, previous)
