"""Triton kernel: the residual step at the index set I in one pass.

Per flat position i * n + j of I: gather G and p, update the two residual moments, form the update U at I (for the
"paper" mode with the gathered products (P R, (P*P) V, P N) at (i, j), looping over the rank), and
write the new weight value p (1 - lr wd) - lr U. Torch reference:
:func:`galore_plus.sparse_residual.values.residual_values` (same signature).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK = 128
BLOCK_RANK = 32


@triton.jit
def _residual_step_kernel(
    param_ptr, param_stride0, param_stride1, grad_ptr, grad_stride0, grad_stride1,
    index_ptr, n_cols, exp_avg_ptr, exp_avg_sq_ptr, out_ptr, count,
    basis_ptr, basis_stride_index, basis_stride_rank,
    low_rank_ptr, low_exp_avg_sq_ptr, direction_ptr, low_stride_rank, low_stride_index, rank,
    beta1, beta2, bias_correction1, bias_correction2, eps, decay, lr, scale,
    PAPER: tl.constexpr, LEFT: tl.constexpr, BLOCK: tl.constexpr, BLOCK_RANK: tl.constexpr,
):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < count
    index = tl.load(index_ptr + offsets, mask=mask, other=0)
    rows = index // n_cols
    cols = index % n_cols
    grad = tl.load(grad_ptr + rows * grad_stride0 + cols * grad_stride1, mask=mask, other=0.0).to(tl.float32)
    weight = tl.load(param_ptr + rows * param_stride0 + cols * param_stride1, mask=mask, other=0.0).to(tl.float32)
    exp_avg = tl.load(exp_avg_ptr + offsets, mask=mask, other=0.0)
    exp_avg_sq = tl.load(exp_avg_sq_ptr + offsets, mask=mask, other=0.0)
    if PAPER:
        if LEFT:
            basis_index = rows
            low_index = cols
        else:
            basis_index = cols
            low_index = rows
        ghat = tl.zeros((BLOCK,), dtype=tl.float32)
        vrec = tl.zeros((BLOCK,), dtype=tl.float32)
        lowrank_update = tl.zeros((BLOCK,), dtype=tl.float32)
        for start in range(0, rank, BLOCK_RANK):
            ks = start + tl.arange(0, BLOCK_RANK)
            both = mask[:, None] & (ks < rank)[None, :]
            basis = tl.load(basis_ptr + basis_index[:, None] * basis_stride_index + ks[None, :] * basis_stride_rank,
                            mask=both, other=0.0)
            low_offsets = ks[None, :] * low_stride_rank + low_index[:, None] * low_stride_index
            ghat += tl.sum(basis * tl.load(low_rank_ptr + low_offsets, mask=both, other=0.0), axis=1)
            vrec += tl.sum(basis * basis * tl.load(low_exp_avg_sq_ptr + low_offsets, mask=both, other=0.0), axis=1)
            lowrank_update += tl.sum(basis * tl.load(direction_ptr + low_offsets, mask=both, other=0.0), axis=1)
        dgrad = grad - ghat
        exp_avg = exp_avg + (1.0 - beta1) * (dgrad - exp_avg)
        exp_avg_sq = exp_avg_sq * beta2 + 2.0 * (1.0 - beta2) * ghat * dgrad
        denom = tl.sqrt(tl.maximum((vrec + exp_avg_sq) / bias_correction2, 0.0)) + eps
        update = ((exp_avg / bias_correction1) / denom + lowrank_update) * scale
    else:
        exp_avg = exp_avg + (1.0 - beta1) * (grad - exp_avg)
        exp_avg_sq = exp_avg_sq * beta2 + (1.0 - beta2) * grad * grad
        denom = tl.sqrt(exp_avg_sq / bias_correction2) + eps
        update = (exp_avg / bias_correction1) / denom * scale
    tl.store(exp_avg_ptr + offsets, exp_avg, mask=mask)
    tl.store(exp_avg_sq_ptr + offsets, exp_avg_sq, mask=mask)
    tl.store(out_ptr + offsets, weight * decay - lr * update, mask=mask)


def residual_values_triton(
    param: Tensor, grad: Tensor, index: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor,
    basis: Tensor, side: str, low_rank: Tensor, lowrank_exp_avg_sq: Tensor, direction: Tensor,
    mode: str, step: int, residual_step: int, beta1: float, beta2: float, eps: float,
    lr: float, weight_decay: float, scale: float,
) -> Tensor:
    """Update the residual moments at I in place and return the new float32 weight values at I."""
    if exp_avg.dtype != torch.float32 or exp_avg_sq.dtype != torch.float32:
        raise TypeError("the residual moments must be float32")
    if not (exp_avg.is_contiguous() and exp_avg_sq.is_contiguous() and index.is_contiguous()):
        raise ValueError("the index and the residual moments must be contiguous")
    if index.dtype != torch.int64:
        raise TypeError("the index must hold int64 flat positions")
    count = index.numel()
    values = torch.empty(count, dtype=torch.float32, device=param.device)
    if count == 0:
        return values
    paper = mode == "paper"
    bias_step = step if paper else residual_step
    low_rank, lowrank_exp_avg_sq, direction = (x.contiguous() for x in (low_rank, lowrank_exp_avg_sq, direction))
    if side == "left":
        basis_strides = basis.stride()
        low_strides = low_rank.stride()
    else:
        basis_strides = (basis.stride(1), basis.stride(0))
        low_strides = (low_rank.stride(1), low_rank.stride(0))
    _residual_step_kernel[(triton.cdiv(count, BLOCK),)](
        param, param.stride(0), param.stride(1), grad, grad.stride(0), grad.stride(1),
        index, param.shape[1], exp_avg, exp_avg_sq, values, count,
        basis, *basis_strides, low_rank, lowrank_exp_avg_sq, direction, *low_strides, low_rank.shape[0 if side == "left" else 1],
        beta1, beta2, 1 - beta1**bias_step, 1 - beta2**bias_step, eps, 1 - lr * weight_decay, lr, scale,
        PAPER=paper, LEFT=side == "left", BLOCK=BLOCK, BLOCK_RANK=BLOCK_RANK,
    )
    return values
