"""The ``"muon"`` update rule: Muon's orthogonalised step with its momentum kept in the low-rank subspace.

For a weight with gradient G (m, n), basis P (m, r) | Q (r, n) and R = P^T G | G Q^T:

1. momentum of R only: M <- b1 M + (1 - b1) R (``exp_avg``, R's shape), Nesterov's look-ahead
   N = (1 - b1) R + b1 M (as ``torch.optim.Muon``'s ``nesterov=True``, with ``momentum = betas[0]``);
2. a full-size direction that is N inside the subspace and the gradient itself outside it:
   D = G + P (N - R) | G + (N - R) Q, i.e. P N + (G - P R);
3. D orthogonalised jointly by five quintic Newton-Schulz iterations (:func:`newton_schulz`, in
   float32), so the part outside the subspace is not left unscaled as in GaLore and is not given a
   separate norm as in Fira's residual;
4. p <- p (1 - lr wd) - lr scale 0.2 sqrt(max(m, n)) O: the RMS of AdamW's update at ``scale=1``
   (``torch.optim.Muon``'s ``adjust_lr_fn="match_rms_adamw"``), so an AdamW learning rate is about right.

With a full-rank basis (r = min(m, n)), D is the Nesterov momentum of G and the rule is
``torch.optim.Muon``; at rank r it keeps r (m or n) moment values instead of Muon's m n. The
second moment ``exp_avg_sq`` is not read (it stays zero). The weight needs all its rows: the rule
refuses FSDP2 row shards. The full-size D and the iterations cost about as much as Muon's step.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any

import torch
from torch import Tensor

from ..group_keys import Fail
from ..step.row_blocks import widened_dtype
from .base import UpdateInputs, UpdateRule, require_whole_weight

NEWTON_SCHULZ_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NEWTON_SCHULZ_STEPS = 5


def newton_schulz(matrix: Tensor, steps: int = NEWTON_SCHULZ_STEPS, eps: float = 1e-7) -> Tensor:
    """Quintic Newton-Schulz iterations towards the orthogonal factor U V^T of ``matrix`` = U S V^T (Muon's
    coefficients: singular values land in about [0.7, 1.2], not exactly 1); float32, the wide side last."""
    a, b, c = NEWTON_SCHULZ_COEFFICIENTS
    tall = matrix.shape[0] > matrix.shape[1]
    x = matrix.t() if tall else matrix
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.t()
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.t() if tall else x


def muon_momentum_direction(low_rank: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: int, beta1: float,
                            beta2: float, eps: float) -> Tensor:
    """Step 1: updates the momentum M in place with R and returns Nesterov's N = (1 - b1) R + b1 M."""
    exp_avg.lerp_(low_rank, 1.0 - beta1)
    return low_rank.lerp(exp_avg, beta1)


def rms_matching_ratio(shape: tuple[int, int]) -> float:
    """0.2 sqrt(max(m, n)): an orthogonal (m, n) update times this has about AdamW's update RMS."""
    return 0.2 * math.sqrt(max(shape))


def muon_rule(inputs: UpdateInputs, state: dict[str, Any], group: dict[str, Any]) -> None:
    """Steps 2-4 on one weight; leaves the weight
    unchanged, on the device, when ``inputs.finite`` is False."""
    require_whole_weight("muon", inputs.weight.shape, inputs.shape, "it orthogonalises the whole weight")
    correction = inputs.direction - inputs.low_rank
    grad = inputs.grad.to(widened_dtype(inputs.grad.dtype))
    if inputs.side == "left":
        direction = torch.addmm(grad, inputs.basis.to(grad.dtype), correction.to(grad.dtype))
    else:
        direction = torch.addmm(grad, correction.to(grad.dtype), inputs.basis.to(grad.dtype))
    orthogonal = newton_schulz(torch.nan_to_num(direction))
    step_size = group["lr"] * group["scale"] * rms_matching_ratio(inputs.shape)
    decay = 1.0 - group["lr"] * group["weight_decay"]
    weight = inputs.weight
    updated = (weight.to(orthogonal.dtype) * decay).sub_(orthogonal, alpha=step_size)
    weight.copy_(torch.where(inputs.finite, updated.to(weight.dtype), weight))


def check_scale(group: dict, fail: Fail) -> None:
    """Muon's ``scale`` is a number >= 0 that multiplies its RMS-matched step."""
    if isinstance(group["scale"], bool) or not isinstance(group["scale"], Real) or group["scale"] < 0:
        fail("scale", f"update_rule 'muon' multiplies its RMS-matched step by scale, a number >= 0 (1 matches AdamW's "
                      f"update RMS), got {group['scale']!r}")


MUON = UpdateRule(muon_rule, direction=muon_momentum_direction, check_group=check_scale,
                  accumulation_refusal="its step orthogonalises the full gradient, so it reads the full gradient, "
                                       "which accumulation in the subspace never forms")
