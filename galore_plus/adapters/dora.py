"""DoRA (Liu et al.): ``y = m / ||W + s B A||_c * (W + s B A) x + b``, and the weight decomposition it
shares with DVoRA."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .lora import LoRALinear


class WeightDecomposition:
    """Mixin for an adapter with ``delta_weight()`` and ``delta_output(x)``: the layer becomes
    ``m / ||W + delta||_c * (W + delta)`` with a trainable ``magnitude`` ``m`` (one per output feature).

    ``||.||_c`` is the L2 norm of each output feature's weight row (``dim=1`` of the ``(out, in)``
    weight). As in the DoRA paper (Sec. 4.3) and ``peft``, the norm is detached: it gets no gradient.
    """

    base: nn.Linear
    magnitude: nn.Parameter

    def init_magnitude(self) -> None:
        """``magnitude = ||W + delta||_c``, so the decomposition leaves the layer unchanged."""
        with torch.no_grad():
            self.magnitude = nn.Parameter(torch.linalg.vector_norm(self.base.weight + self.delta_weight(), dim=1))

    def magnitude_scale(self, delta: torch.Tensor) -> torch.Tensor:
        """``m / ||W + delta||_c`` per output feature, shape ``(out,)``, with the norm detached."""
        with torch.no_grad():
            norm = torch.linalg.vector_norm(self.base.weight + delta, dim=1)
        return self.magnitude / norm

    def adapter_output(self, x: torch.Tensor) -> torch.Tensor:
        """``(scale - 1) * W x + scale * delta x``, which turns ``W x`` into ``scale * (W + delta) x``."""
        scale = self.magnitude_scale(self.delta_weight())
        return (scale - 1.0) * F.linear(x, self.base.weight) + scale * self.delta_output(x)

    def merged_weight(self) -> torch.Tensor:
        delta = self.delta_weight()
        return self.magnitude_scale(delta).unsqueeze(1) * (self.base.weight + delta)


class DoRALinear(WeightDecomposition, LoRALinear):
    """DoRA: ``y = m / ||W + s B A||_c * (W + s B A) x + b``.

    A LoRA layer whose weight is split into a magnitude and a direction (see
    :class:`WeightDecomposition`); ``magnitude`` starts at ``||W||_c``.
    Trainable parameters: ``rank * (in + out) + out``.
    """

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        alpha: float | None = None,
        dropout: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(base, rank, alpha, dropout, generator)
        self.init_magnitude()
