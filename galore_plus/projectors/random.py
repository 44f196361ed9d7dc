"""The ``random`` projector: a seeded Gaussian basis that is regenerated at every step, never stored.

The basis has i.i.d. N(0, 1/r) entries (APOLLO's convention, Zhu et al. 2024): a
Johnson-Lindenstrauss sketch with E[P P^T] = I_m (left side, P of shape (m, r)) and
E[Q^T Q] = I_n (right side, Q of shape (r, n)), so the low-rank gradient R = P^T G or G Q^T has
about the norm of G whatever r and the weight's size. It is not orthonormalised: its columns
(left) or rows (right) have squared norm about m / r (or n / r), not 1. APOLLO's update rule
only reads norms of R and of its Adam direction, which this scaling keeps comparable across
ranks; that is why APOLLO's recommended ``scale`` values (1 at rank n/4, 128 at rank 1) hold for
this basis and would not for an orthonormal one.

Registered as ``PROJECTORS["random"]`` with ``stores_basis=False``. Only the generator decides the numbers: drawn from :func:`galore_plus.projectors.generators.basis_generator`
``(seed, weight position, refresh count)``, the same basis comes back after a resume and on every
data-parallel rank, so the optimizer state needs no basis at all.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..step.shapes import Shape, Side, basis_shape
from ..step.stacks import Generators, generator_device, seeded_normal
from .base import PROJ_TYPE_KEY, Projector


def gaussian_basis(shape: Shape, rank: int, side: Side, generator: Generators) -> Tensor:
    """A float32 basis of an (m, n) weight with N(0, 1/rank) entries: (m, rank) for ``side="left"``, else (rank, n);
    for a stack (E, m, n) with one generator per expert, a stack of E such bases."""
    return seeded_normal(basis_shape(shape, rank, side)[-2:], generator, generator_device(generator)).div_(math.sqrt(rank))


def random_orthonormal_basis(shape: Shape, rank: int, side: Side, generator: Generators,
                             device: torch.device) -> Tensor:
    """A random orthonormal basis (a stack of them for a stack): the fallback when no decomposition of the gradient
    is usable."""
    m, n = shape[-2:]
    size = m if side == "left" else n
    q, _ = torch.linalg.qr(seeded_normal((size, rank), generator, device))
    return q.contiguous() if side == "left" else q.mT.contiguous()


def _random(read: None, shape: Shape, group: dict, side: Side, generator: Generators, previous: None) -> Tensor:
    return gaussian_basis(shape, group["rank"], side, generator)


RANDOM = Projector(_random, stores_basis=False, keys=PROJ_TYPE_KEY,
                  accumulation_refusal="a random basis is not orthonormal, so the accumulated R does not measure the "
                                       "gradient's energy")
