"""Weights that are a stack of E independent matrices (E, m, n): mixture-of-experts weights, computed batched.

A projected weight is stepped as one matrix (m, n) or as a stack (E, m, n) whose matrices (experts)
are independent: each has its own basis, moments, refresh, norms and limiter state, and the step
computes all of them at once (batched ``torch.linalg`` decompositions, ``bmm``/``baddbmm``), with
the same code as a single matrix. The helpers here are the few places where the two differ:

* a sum "over the whole weight" is a 0-d tensor for a matrix and one value per expert, shaped
  (E, 1, 1) so that it broadcasts over the stack, for a stack (:func:`matrix_sum`);
* a product added in place is ``addmm_`` or ``baddbmm_`` (:func:`add_product_`);
* random numbers come from one seeded generator per expert (:func:`galore_plus.projectors.generators.basis_generators`): expert e
  of a stack at position p draws exactly what a 2-D weight at position p of an optimizer with
  seed :func:`expert_seed` (seed, e) draws, whatever the stack's size, so a stack's step equals
  its experts' steps as separate 2-D weights (``tests/test_stacks.py``).
"""

from __future__ import annotations

import math
from typing import Sequence, Union

import torch
from torch import Tensor

Generators = Union[torch.Generator, list[torch.Generator]]

EXPERT_SEED_STRIDE = 1_000_000_007


def matrix_sum(values: Tensor) -> Tensor:
    """The sum of each matrix of ``values``: 0-d for a matrix (m, n), (E, 1, 1) for a stack (E, m, n)."""
    return values.sum() if values.dim() == 2 else values.sum((-2, -1), keepdim=True)


def add_product_(target: Tensor, a: Tensor, b: Tensor, alpha: float = 1.0) -> Tensor:
    """``target += alpha * a @ b`` in place, for matrices (``addmm_``) or stacks of them (``baddbmm_``)."""
    if target.dim() == 2:
        return target.addmm_(a, b, alpha=alpha)
    return target.baddbmm_(a, b, alpha=alpha)


def expert_seed(seed: int, expert: int) -> int:
    """The optimizer seed whose generators expert ``expert`` of a stack uses (``seed`` itself for expert 0)."""
    return seed + expert * EXPERT_SEED_STRIDE


def seeded_normal(size: Sequence[int], generator: Generators, device: torch.device,
                  dtype: torch.dtype | None = None) -> Tensor:
    """Standard normal values of shape ``size`` from ``generator``, or, from a list of E generators, a stack
    (E, *size) whose matrix e comes from generator e alone."""
    if isinstance(generator, torch.Generator):
        return torch.randn(size, generator=generator, device=device, dtype=dtype)
    return torch.stack([torch.randn(size, generator=each, device=device, dtype=dtype) for each in generator])


def generator_device(generator: Generators) -> torch.device:
    """The device of a generator, or of the first of a list of them."""
    return (generator if isinstance(generator, torch.Generator) else generator[0]).device


def stack_size(shape: Sequence[int]) -> int:
    """How many matrices a weight of stepped ``shape`` holds: 1 for (m, n), E for (E, m, n)."""
    return math.prod(shape[:-2])
