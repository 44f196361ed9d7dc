"""The Adam step on a low-rank gradient: moments, bias correction and the normalised direction N."""

from __future__ import annotations

from torch import Tensor


def update_moments(low_rank_grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, beta1: float, beta2: float) -> None:
    """M <- b1 M + (1 - b1) R and V <- b2 V + (1 - b2) R^2, in place."""
    exp_avg.lerp_(low_rank_grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(low_rank_grad, low_rank_grad, value=1 - beta2)


def lowrank_adam_direction(
    low_rank_grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: int, beta1: float, beta2: float, eps: float
) -> Tensor:
    """Update the moments in place and return N = (M / (1 - b1^t)) / (sqrt(V / (1 - b2^t)) + eps).

    ``exp_avg`` (M) and ``exp_avg_sq`` (V) have the low-rank gradient's shape; ``step`` is t >= 1.
    """
    update_moments(low_rank_grad, exp_avg, exp_avg_sq, beta1, beta2)
    denom = (exp_avg_sq / (1 - beta2**step)).sqrt_().add_(eps)
    return (exp_avg / (1 - beta1**step)).div_(denom)
