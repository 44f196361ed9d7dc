"""Triton kernel: the low-rank Adam step (both moments, bias correction and N) in one pass.

Torch reference: :func:`galore_plus.rules.adam.lowrank_adam_direction` (same signature).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK = 1024


@triton.jit
def _lowrank_adam_kernel(
    grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, out_ptr, numel,
    beta1, beta2, bias_correction1, bias_correction2, eps,
    BLOCK: tl.constexpr,
):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    grad = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    exp_avg = tl.load(exp_avg_ptr + offsets, mask=mask, other=0.0)
    exp_avg_sq = tl.load(exp_avg_sq_ptr + offsets, mask=mask, other=0.0)
    exp_avg = exp_avg + (1.0 - beta1) * (grad - exp_avg)
    exp_avg_sq = exp_avg_sq * beta2 + (1.0 - beta2) * grad * grad
    denom = tl.sqrt(exp_avg_sq / bias_correction2) + eps
    tl.store(exp_avg_ptr + offsets, exp_avg, mask=mask)
    tl.store(exp_avg_sq_ptr + offsets, exp_avg_sq, mask=mask)
    tl.store(out_ptr + offsets, (exp_avg / bias_correction1) / denom, mask=mask)


def lowrank_adam_direction_triton(
    low_rank_grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: int, beta1: float, beta2: float, eps: float
) -> Tensor:
    """Update the float32 moments in place and return N = (M / (1 - b1^t)) / (sqrt(V / (1 - b2^t)) + eps)."""
    for name, tensor in (("low_rank_grad", low_rank_grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if not tensor.is_contiguous() or tensor.shape != exp_avg.shape:
            raise ValueError(f"{name} must be contiguous with the moments' shape {tuple(exp_avg.shape)}")
    if exp_avg.dtype != torch.float32 or exp_avg_sq.dtype != torch.float32:
        raise TypeError("the low-rank moments must be float32")
    direction = torch.empty_like(exp_avg)
    numel = direction.numel()
    _lowrank_adam_kernel[(triton.cdiv(numel, BLOCK),)](
        low_rank_grad, exp_avg, exp_avg_sq, direction, numel,
        beta1, beta2, 1 - beta1**step, 1 - beta2**step, eps, BLOCK=BLOCK,
    )
    return direction
