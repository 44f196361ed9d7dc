"""How far float rounding may move a weight update: the bounds a fast path (a kernel, a low-precision weight) is
checked against its float32 reference with (``benchmarks.gpu_check`` on a GPU, the tests on the CPU)."""

from __future__ import annotations

import torch


def spacing(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The gap between neighbouring numbers of ``dtype`` at each of ``values`` (one unit in the last place), float32."""
    exponent = torch.floor(torch.log2(values.float().abs().clamp_min(torch.finfo(dtype).tiny)))
    return torch.exp2(exponent) * torch.finfo(dtype).eps


def update_magnitude(start: torch.Tensor, decay: float, step_size: float, low_rank, gradient) -> torch.Tensor:
    """|p| d + s (|f| |G| + |P| |X|) of a weight update (``galore_plus.step.apply``'s terms, either may be None): the
    size of the terms summed at each position, which bounds float32's rounding of the sum."""
    total = start.float().abs() * decay
    if low_rank is not None:
        left, right = low_rank.rows(slice(None))
        total = total + step_size * (left.abs() @ right.abs())
    if gradient is not None:
        total = total + step_size * gradient.factor.abs() * gradient.grad.float().abs()
    return total
