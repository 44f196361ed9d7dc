"""Projector strategies: how the basis of a gradient's low-rank subspace is found (orthonormal but for ``random``).

A basis is a plain float32 tensor. Its shape tells the side it projects:

* ``"left"``  (output side, rows):     P of shape (m, r), low-rank gradient R = P^T G (r, n)
* ``"right"`` (input side, columns):   Q of shape (r, n), low-rank gradient R = G Q^T (m, r)

A stack of E independent matrices G (E, m, n) (:mod:`galore_plus.step.stacks`) has a stack of bases,
(E, m, r) or (E, r, n), computed batched by the same functions; ``cross_head`` takes matrices only.

Four strategies give it, registered by name in :data:`PROJECTORS` (a group's ``projector`` key):

* ``svd``         top-r singular vectors by ``torch.linalg.svd`` (GaLore).
* ``randomized``  Halko-Martinsson-Tropp randomized subspace iteration, optionally warm-started
                  from the previous basis.
* ``cross_head``  right singular vectors of the rows of one (or a few) pseudo-randomly chosen
                  attention heads; the basis is shared by every head (GaLore+ section 4.1).
* ``random``      a Gaussian basis with N(0, 1/r) entries, independent of the gradient and never
                  stored: regenerated at every step from the seeded generator (APOLLO; see
                  :mod:`galore_plus.projectors.random`). It is not orthonormal.

Every random choice draws from a ``torch.Generator`` made by :func:`basis_generator` (a list of
them, one per expert, for a stack: :func:`basis_generators`), never from torch's global RNG.

A registry entry is a :class:`Projector`: a basis function of one signature, the gradient rows it
reads (so a row-sharded weight gathers only those), its fixed side if it has one, and whether the
basis is stored in the state or regenerated every step from the seeded generator.
"""

from __future__ import annotations

from torch import Tensor

from ..step.shapes import Shape, Side
from ..step.stacks import Generators
from .base import Projector
from .cross_head import CROSS_HEAD
from .random import RANDOM
from .randomized import RANDOMIZED
from .svd import SVD


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


PROJECTORS: dict[str, Projector] = {"svd": SVD, "randomized": RANDOMIZED, "cross_head": CROSS_HEAD, "random": RANDOM}
# The projector of a group that names none.
DEFAULT_PROJECTOR = "randomized"


def compute_basis(
    read: Tensor | None, shape: Shape, group: dict, side: Side, generator: Generators, previous: Tensor | None
) -> Tensor:
    """The basis chosen by the group's ``projector`` key (see :class:`Projector` for the arguments)."""
    return PROJECTORS[group["projector"]].basis(read, shape, group, side, generator, previous)
