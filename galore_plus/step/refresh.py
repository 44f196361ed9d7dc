"""A projector refresh that never fails: a new basis, or a fallback when the gradient or decomposition is unusable."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..projectors import compute_basis
from ..projectors.random import random_orthonormal_basis
from .finite import all_finite, matrix_finite
from .shapes import Shape, Side, basis_shape
from .stacks import Generators

Warn = Callable[[str, str], None]

FALLBACK_WARNING = ("a projector refresh failed (non-finite gradient or decomposition did not converge); "
                    "kept the previous basis (a random orthonormal one on the first step)")


def refreshed_basis(
    read: Tensor, shape: Shape, group: dict, side: Side, generator: Generators, previous: Tensor | None,
    warn: Warn, check_read: bool = False,
) -> Tensor:
    """The group's projector's basis of ``read`` (the gradient rows it reads), or a fallback.

    Validation costs what the basis costs: the whole gradient is never scanned. A NaN or Inf in
    ``read`` propagates into every product of it, so the basis (r x n or m x r) is checked, and a
    ``LinAlgError`` is caught. ``check_read`` also checks ``read`` itself; use it when ``read`` is
    a few rows (``cross_head``'s chosen heads), where that is cheap. These checks read one bool
    each on the host: a refresh synchronises, a step without one does not.

    Fallback, with ``warn("basis", ...)``: the previous basis when there is one of the right shape,
    otherwise a random orthonormal basis from the same seeded generator. In a stack of matrices
    (E, m, n) only the experts whose basis is not finite fall back; a ``LinAlgError`` of the batched
    decomposition makes every expert fall back.
    """
    rank = group["rank"]
    expected = basis_shape(shape, rank, side)
    if previous is not None and tuple(previous.shape) != expected:
        previous = None
    if not check_read or bool(all_finite(read)):
        try:
            basis = compute_basis(read, shape, group, side, generator, previous)
            finite = matrix_finite(basis)
            if bool(finite.all()):
                return basis
            if basis.dim() > 2:
                warn("basis", FALLBACK_WARNING)
                return torch.where(finite, basis, _fallback(shape, rank, side, generator, previous, read.device))
        except torch.linalg.LinAlgError:
            pass
    warn("basis", FALLBACK_WARNING)
    return _fallback(shape, rank, side, generator, previous, read.device)


def _fallback(shape: Shape, rank: int, side: Side, generator: Generators, previous: Tensor | None,
              device: torch.device) -> Tensor:
    """The previous basis when there is one, else a random orthonormal one."""
    if previous is not None:
        return previous
    return random_orthonormal_basis(shape, rank, side, generator, device)
