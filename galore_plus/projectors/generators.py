"""The seeded generators every random choice of a projector draws from (never torch's global RNG)."""

from __future__ import annotations

import torch

from ..step.stacks import Generators, expert_seed, stack_size


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
    expert for a stack (E, m, n), expert e's from seed :func:`~galore_plus.step.stacks.expert_seed` (seed, e)."""
    if len(shape) == 2:
        return basis_generator(seed, param_index, refresh_index, device)
    return [basis_generator(expert_seed(seed, expert), param_index, refresh_index, device)
            for expert in range(stack_size(shape))]
