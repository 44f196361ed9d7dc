"""Triton kernel: a weight's whole update in one pass, p <- p d - step_size (f G + P X | f G + X Q).

Each program owns one tile of the weight: it reads the tile of p and of G once, forms the tile of the
back-projection P X (or X Q) with ``tl.dot`` over the rank (float32 inputs, IEEE precision: no
TF32), adds f G, decays, and writes the tile back in the weight's dtype, rounded to nearest (even);
where ``finite`` is False the tile is written back unchanged. A bfloat16 weight is rounded with
integer arithmetic on the float32 bits: Triton's interpreter truncates a float32 -> bfloat16 cast,
which would lose every update smaller than a unit in the last place, and this way the rounding is
the same in the interpreter as on the GPU. No float32 copy of a half-precision weight or gradient and no
full-size temporary exists. Torch reference: :func:`galore_plus.step.apply.apply_update` (same
arguments; it goes through float32 row blocks instead).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..step.apply import LowRankTerm, ScaledGradient

BLOCK_ROWS = 64
BLOCK_COLS = 64
BLOCK_RANK = 32
WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _weight_update_kernel(
    weight_ptr, weight_stride0, weight_stride1, grad_ptr, grad_stride0, grad_stride1,
    factor_ptr, factor_stride0, factor_stride1, left_ptr, left_stride0, left_stride1,
    right_ptr, right_stride0, right_stride1, finite_ptr, rows, cols, rank, decay, step_size,
    HAS_GRADIENT: tl.constexpr, HAS_LOW_RANK: tl.constexpr, ROUND_TO_BFLOAT16: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, BLOCK_RANK: tl.constexpr,
):
    row = (tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)  # offsets may pass 2^31
    col = (tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)).to(tl.int64)
    row_in, col_in = row < rows, col < cols
    mask = row_in[:, None] & col_in[None, :]
    weight_at = weight_ptr + row[:, None] * weight_stride0 + col[None, :] * weight_stride1
    weight = tl.load(weight_at, mask=mask, other=0.0)
    update = tl.zeros((BLOCK_ROWS, BLOCK_COLS), dtype=tl.float32)
    if HAS_LOW_RANK:
        for start in range(0, rank, BLOCK_RANK):
            inner = start + tl.arange(0, BLOCK_RANK)
            inner_in = inner < rank
            left = tl.load(left_ptr + row[:, None] * left_stride0 + inner[None, :] * left_stride1,
                           mask=row_in[:, None] & inner_in[None, :], other=0.0)
            right = tl.load(right_ptr + inner[:, None] * right_stride0 + col[None, :] * right_stride1,
                            mask=inner_in[:, None] & col_in[None, :], other=0.0)
            update += tl.dot(left, right, input_precision="ieee")
    if HAS_GRADIENT:
        grad = tl.load(grad_ptr + row[:, None] * grad_stride0 + col[None, :] * grad_stride1, mask=mask, other=0.0)
        factor = tl.load(factor_ptr + row[:, None] * factor_stride0 + col[None, :] * factor_stride1, mask=mask,
                         other=0.0)
        update += factor * grad.to(tl.float32)
    new = weight.to(tl.float32) * decay - step_size * update
    if ROUND_TO_BFLOAT16:
        bits = new.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        rounded = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        rounded = new.to(weight.dtype)
    finite = tl.load(finite_ptr) != 0
    tl.store(weight_at, tl.where(finite, rounded, weight), mask=mask)


def apply_update_triton(
    param: Tensor, step_size: float, decay: float, finite: Tensor, low_rank: LowRankTerm | None = None,
    gradient: ScaledGradient | None = None, block_values: int | None = None,
) -> None:
    """:func:`galore_plus.step.apply.apply_update` in one kernel (``block_values`` is unused: tiles are fixed).

    ``param`` (any strides) is float32, bfloat16 or float16; X, the basis and f are float32.
    """
    if param.dim() != 2 or param.dtype not in WEIGHT_DTYPES:
        raise TypeError(f"the kernel updates a 2-D float32/bfloat16/float16 weight, not {param.dtype} {tuple(param.shape)}")
    if low_rank is None and gradient is None:
        raise ValueError("apply_update needs a low-rank term, a scaled gradient or both")
    rows, cols = param.shape
    flag = finite.to(torch.int8)
    left, right = low_rank.rows(slice(None)) if low_rank is not None else (param, param)
    grad = gradient.grad if gradient is not None else param
    factor = gradient.factor.to(torch.float32).expand(rows, cols) if gradient is not None else param
    grid = (triton.cdiv(rows, BLOCK_ROWS), triton.cdiv(cols, BLOCK_COLS))
    _weight_update_kernel[grid](
        param, *param.stride(), grad, *grad.stride(), factor, *factor.stride(), left, *left.stride(),
        right, *right.stride(), flag, rows, cols, left.shape[1], decay, step_size,
        HAS_GRADIENT=gradient is not None, HAS_LOW_RANK=low_rank is not None,
        ROUND_TO_BFLOAT16=param.dtype == torch.bfloat16,
        BLOCK_ROWS=BLOCK_ROWS, BLOCK_COLS=BLOCK_COLS, BLOCK_RANK=BLOCK_RANK,
    )
