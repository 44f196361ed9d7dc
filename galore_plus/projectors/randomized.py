"""The ``randomized`` projector: Halko-Martinsson-Tropp randomized subspace iteration, optionally warm-started from
the previous basis (GaLore+)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..step.shapes import Shape, Side
from ..step.stacks import Generators, seeded_normal
from ..group_keys import GroupKey, boolean, integer
from .base import PROJ_TYPE_KEY, STORED_BASIS_KEYS, Projector, warm_previous

# The keys of a randomized sketch: extra columns, power iterations, the previous basis as the first columns.
SKETCH_KEYS = {"oversample": GroupKey(8, integer(0)), "power_iters": GroupKey(2, integer(0)),
               "warm_start": GroupKey(True, boolean)}


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


def _randomized(
    read: Tensor, shape: Shape, group: dict, side: Side, generator: Generators, previous: Tensor | None
) -> Tensor:
    return randomized_basis(read, group["rank"], side, generator, group["oversample"], group["power_iters"],
                            warm_previous(group, previous))


# The GaLore+ projectors (randomized, cross_head) default to Fira's full-rank residual: on them it takes fine-tuning
# from +0.015 to -0.042 nats/byte against tuned AdamW (docs/levers.md); svd (GaLore) and random (APOLLO) keep their
# authors' updates.
RANDOMIZED = Projector(_randomized, keys={**PROJ_TYPE_KEY, **SKETCH_KEYS, **STORED_BASIS_KEYS},
                       rule_defaults={"full_rank_residual": True})
