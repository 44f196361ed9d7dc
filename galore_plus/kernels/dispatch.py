"""The one place that chooses between a Triton kernel and its torch reference.

A kernel is used when the tensors are on a CUDA device and ``triton`` imports; everywhere else
(CPU, or no Triton) the torch reference of the same signature runs. The kernel modules are only
imported on first CUDA use, so CPU runs never pay for importing Triton.
"""

from __future__ import annotations

import functools

from torch import Tensor

from ..rules.adam import lowrank_adam_direction as torch_lowrank_adam_direction
from ..sparse_residual.values import residual_values as torch_residual_values
from ..step.apply import apply_update as torch_apply_update


@functools.cache
def triton_available() -> bool:
    """Whether ``triton`` imports (checked once, and only when a CUDA tensor first asks)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_kernel(tensor: Tensor) -> bool:
    """Whether the Triton kernel should handle this tensor: a CUDA matrix (a stack of matrices (E, m, n) takes
    the torch reference, which is batched)."""
    return tensor.is_cuda and tensor.dim() == 2 and triton_available()


def lowrank_adam_direction(
    low_rank_grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: int, beta1: float, beta2: float, eps: float
) -> Tensor:
    """:func:`galore_plus.rules.adam.lowrank_adam_direction`, fused into one kernel on CUDA."""
    if use_kernel(low_rank_grad):
        from .lowrank_adam import lowrank_adam_direction_triton

        return lowrank_adam_direction_triton(low_rank_grad, exp_avg, exp_avg_sq, step, beta1, beta2, eps)
    return torch_lowrank_adam_direction(low_rank_grad, exp_avg, exp_avg_sq, step, beta1, beta2, eps)


def residual_values(*args, **kwargs) -> Tensor:
    """:func:`galore_plus.sparse_residual.values.residual_values` (same arguments), one kernel on CUDA."""
    param = args[0] if args else kwargs["param"]
    if use_kernel(param):
        from .residual_step import residual_values_triton

        return residual_values_triton(*args, **kwargs)
    return torch_residual_values(*args, **kwargs)


def apply_update(param: Tensor, *args, **kwargs) -> None:
    """:func:`galore_plus.step.apply.apply_update` (same arguments); on CUDA one kernel per weight for a float32,
    bfloat16 or float16 weight (:mod:`galore_plus.kernels.weight_update`), which reads the weight and the
    gradient once and forms the back-projection tile by tile."""
    if use_kernel(param):
        from .weight_update import WEIGHT_DTYPES, apply_update_triton

        if param.dtype in WEIGHT_DTYPES:
            return apply_update_triton(param, *args, **kwargs)
    return torch_apply_update(param, *args, **kwargs)
