"""Hydra (Kim et al.): a parallel and a sequential low-rank branch on one layer, mergeable into one weight."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import AdapterLinear, kaiming_uniform


class HydraLinear(AdapterLinear):
    """Hydra: ``y = h + s * B_p A_p x + s * B_s A_s h`` with ``h = W x + b`` and ``s = alpha / rank``.

    The parallel branch (``parallel_down`` ``A_p`` (rank, in), ``parallel_up`` ``B_p`` (out, rank))
    reads the layer's input, as LoRA does; the sequential branch (``sequential_down`` ``A_s``
    (rank, out), ``sequential_up`` ``B_s`` (out, rank)) reads the frozen layer's output ``h``, as a
    sequential adapter does. The down projections are Kaiming-uniform, the up projections zero, so a
    fresh layer equals the base layer. Merged: ``W' = W + s B_p A_p + s B_s A_s W`` and
    ``b' = b + s B_s A_s b``. Dropout, when enabled, applies to each branch's input (``x`` and ``h``).
    Trainable parameters: ``rank * (in + 3 * out)``.
    """

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        alpha: float | None = None,
        dropout: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(base, rank, alpha, dropout)
        weight = base.weight
        parallel_down = kaiming_uniform(rank, self.in_features, generator)
        sequential_down = kaiming_uniform(rank, self.out_features, generator)
        self.parallel_down = nn.Parameter(parallel_down.to(device=weight.device, dtype=weight.dtype))
        self.parallel_up = nn.Parameter(weight.new_zeros(self.out_features, rank))
        self.sequential_down = nn.Parameter(sequential_down.to(device=weight.device, dtype=weight.dtype))
        self.sequential_up = nn.Parameter(weight.new_zeros(self.out_features, rank))

    def sequential_matrix(self) -> torch.Tensor:
        """``s * B_s A_s``, shape ``(out, out)``: what the sequential branch adds to ``h``."""
        return self.scaling * (self.sequential_up @ self.sequential_down)

    def delta_weight(self) -> torch.Tensor:
        parallel = self.scaling * (self.parallel_up @ self.parallel_down)
        return parallel + self.sequential_matrix() @ self.base.weight

    def parallel_output(self, x: torch.Tensor) -> torch.Tensor:
        """``s * B_p A_p x``."""
        return self.scaling * F.linear(F.linear(x, self.parallel_down), self.parallel_up)

    def sequential_output(self, h: torch.Tensor) -> torch.Tensor:
        """``s * B_s A_s h``."""
        return self.scaling * F.linear(F.linear(h, self.sequential_down), self.sequential_up)

    def delta_output(self, x: torch.Tensor) -> torch.Tensor:
        return self.parallel_output(x) + self.sequential_output(F.linear(x, self.base.weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base(x)
        return h + self.parallel_output(self.dropout(x)) + self.sequential_output(self.dropout(h))

    def merged_bias(self) -> torch.Tensor | None:
        bias = self.base.bias
        return None if bias is None else bias + self.sequential_matrix() @ bias
