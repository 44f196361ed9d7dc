"""LoRA (Hu et al.): ``y = W x + b + (alpha / rank) * B A x``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import AdapterLinear, kaiming_uniform


class LoRALinear(AdapterLinear):
    """LoRA: ``y = W x + b + (alpha / rank) * B A x``.

    ``lora_A`` (rank, in) is Kaiming-uniform initialised as in ``nn.Linear``; ``lora_B`` (out, rank)
    starts at zero, so the adapted layer initially equals the base layer.
    Trainable parameters: ``rank * (in + out)``.
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
        lora_A = kaiming_uniform(rank, self.in_features, generator)
        self.lora_A = nn.Parameter(lora_A.to(device=weight.device, dtype=weight.dtype))
        self.lora_B = nn.Parameter(weight.new_zeros(self.out_features, rank))

    def delta_weight(self) -> torch.Tensor:
        """The scaled low-rank update ``s * B A``, shape ``(out, in)``."""
        return self.scaling * (self.lora_B @ self.lora_A)

    def delta_output(self, x: torch.Tensor) -> torch.Tensor:
        """``s * B A x`` computed without forming ``B A``."""
        return self.scaling * F.linear(F.linear(x, self.lora_A), self.lora_B)
