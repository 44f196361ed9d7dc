"""DVoRA (Liu et al., DoRA paper): DoRA's magnitude/direction split with VeRA's update as the direction's change."""

from __future__ import annotations

from torch import nn

from .dora import WeightDecomposition
from .vera import VeRALinear, VeRAProjections


class DVoRALinear(WeightDecomposition, VeRALinear):
    """DVoRA: ``y = m / ||W + s Λ_b B Λ_d A||_c * (W + s Λ_b B Λ_d A) x + b``.

    ``A``, ``B`` are VeRA's frozen random matrices (shared per shape); ``lambda_d`` (rank,),
    ``lambda_b`` (out,) and the DoRA ``magnitude`` (out,) train. ``magnitude`` starts at ``||W||_c``
    and ``lambda_b`` at 0, so the fresh layer equals the base layer. The row norm is detached as
    in DoRA. Trainable parameters: ``rank + 2 * out``.
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
        super().__init__(base, rank, alpha, dropout, projections, seed, d_initial)
        self.init_magnitude()
