"""VeRA (Kopiczko et al.): ``y = W x + b + (alpha / rank) * Λ_b B Λ_d A x`` with frozen random ``A``, ``B``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import AdapterLinear, BuildContext, kaiming_uniform


class VeRAProjections(nn.Module):
    """Frozen random ``A`` (rank, in) and ``B`` (out, rank) shared by VeRA layers of one shape.

    Both are Kaiming-uniform draws from a CPU generator seeded with ``seed``, so they are a fixed
    function of ``(in_features, out_features, rank, seed)``. They are non-persistent buffers: they
    are left out of ``state_dict()`` and rebuilt from the seed when adapters are added again.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        seed: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        A = kaiming_uniform(rank, in_features, generator, a=0.0)
        B = kaiming_uniform(out_features, rank, generator, a=0.0)
        self.seed = seed
        self.register_buffer("A", A.to(device=device, dtype=dtype), persistent=False)
        self.register_buffer("B", B.to(device=device, dtype=dtype), persistent=False)

    def extra_repr(self) -> str:
        rank, in_features = self.A.shape
        return f"in_features={in_features}, out_features={self.B.shape[0]}, rank={rank}, seed={self.seed}"


def shared_projections(base: nn.Linear, rank: int, context: BuildContext) -> VeRAProjections:
    """The projections of ``base``'s shape, device and dtype in ``context``, made on first use."""
    weight = base.weight
    key = ("vera", base.in_features, base.out_features, weight.device, weight.dtype)
    if key not in context.shared:
        context.shared[key] = VeRAProjections(
            base.in_features, base.out_features, rank, context.seed, device=weight.device, dtype=weight.dtype
        )
    return context.shared[key]


class VeRALinear(AdapterLinear):
    """VeRA: ``y = W x + b + (alpha / rank) * Λ_b B Λ_d A x``.

    Only ``lambda_d`` (rank,) and ``lambda_b`` (out,) are trained; they start at 0.1 and 0 as in
    ``peft``. ``projections`` holds the frozen ``A`` and ``B``; pass the same instance to every layer
    of one shape to share them, or leave it out to build them from ``seed``. The VeRA paper has no
    ``alpha``; the default ``alpha=rank`` gives ``s = 1``, which is the paper's and ``peft``'s layer.
    Trainable parameters: ``rank + out``.
    """

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        alpha: float | None = None,
        dropout: float = 0.0,
        projections: VeRAProjections | None = None,
        seed: int = 0,
        d_initial: float = 0.1,
    ) -> None:
        super().__init__(base, rank, alpha, dropout)
        weight = base.weight
        if projections is None:
            projections = VeRAProjections(
                self.in_features, self.out_features, rank, seed, device=weight.device, dtype=weight.dtype
            )
        expected = ((rank, self.in_features), (self.out_features, rank))
        if (tuple(projections.A.shape), tuple(projections.B.shape)) != expected:
            raise ValueError(
                f"VeRA projections have A {tuple(projections.A.shape)} and B {tuple(projections.B.shape)}, "
                f"expected A {expected[0]} and B {expected[1]}"
            )
        self.projections = projections
        self.lambda_d = nn.Parameter(weight.new_full((rank,), d_initial))
        self.lambda_b = nn.Parameter(weight.new_zeros(self.out_features))

    @classmethod
    def from_linear(
        cls, base: nn.Linear, rank: int, alpha: float | None, dropout: float, context: BuildContext
    ) -> VeRALinear:
        return cls(base, rank, alpha, dropout, projections=shared_projections(base, rank, context))

    def delta_weight(self) -> torch.Tensor:
        """The scaled update ``s * Λ_b B Λ_d A``, shape ``(out, in)``."""
        B = self.lambda_b.unsqueeze(1) * self.projections.B
        A = self.lambda_d.unsqueeze(1) * self.projections.A
        return self.scaling * (B @ A)

    def delta_output(self, x: torch.Tensor) -> torch.Tensor:
        """``s * Λ_b B Λ_d A x`` computed without forming the ``(out, in)`` update."""
        hidden = self.lambda_d * F.linear(x, self.projections.A)
        return self.scaling * self.lambda_b * F.linear(hidden, self.projections.B)
