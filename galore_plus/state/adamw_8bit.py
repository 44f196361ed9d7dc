"""8-bit AdamW of plain tensors (no ``rank``) with ``optim_bits=8``: bitsandbytes' blockwise update, in chunks on the CPU.

Tensors with at least :data:`MIN_8BIT_SIZE` values keep their moments as the 8-bit codes of
:mod:`galore_plus.state.moments_8bit`; :func:`adamw_step_8bit` runs bitsandbytes' own blockwise
8-bit AdamW update, on the CPU in chunks of :data:`CHUNK_VALUES` consecutive values (whole blocks),
so that its float32 temporaries stay small: bitsandbytes' CPU backend dequantises its whole input,
about 24 bytes of float32 temporaries per value (2.9 GiB for a 32000 x 4096 embedding), where a
chunk needs about 100 MiB.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import Tensor

from .moments_8bit import BLOCKSIZE, MOMENT_KEYS, absmax_count, dynamic_map

MIN_8BIT_SIZE = 4096
CHUNK_VALUES = 1 << 22  # values per chunk of the CPU 8-bit AdamW step: 16384 whole blocks


def uses_8bit_adamw(param: Tensor) -> bool:
    """Whether a plain AdamW tensor gets 8-bit moments (bitsandbytes' rule: at least 4096 values)."""
    return param.numel() >= MIN_8BIT_SIZE


def init_adamw_state_8bit(state: dict[str, Any], param: Tensor) -> None:
    """Zero 8-bit moments (codes and absmax) and a float32 step counter for a plain AdamW tensor."""
    blocks = absmax_count(param.numel())
    state["step"] = torch.tensor(0.0)
    for key in MOMENT_KEYS:
        state[f"{key}_codes"] = torch.zeros(param.shape, dtype=torch.uint8, device=param.device)
        state[f"{key}_absmax"] = torch.zeros(blocks, dtype=torch.float32, device=param.device)


def blockwise_chunks(
    values: list[Tensor], absmax: list[Tensor], chunk_values: int
) -> Iterator[tuple[list[Tensor], list[Tensor]]]:
    """Views of consecutive chunks of at most ``chunk_values`` values of the contiguous, same-size tensors
    ``values``, with the views of those chunks' blocks in ``absmax``; every chunk starts at a block boundary."""
    if chunk_values <= 0 or chunk_values % BLOCKSIZE:
        raise ValueError(f"chunk_values must be a positive multiple of {BLOCKSIZE}, got {chunk_values}")
    flat = [tensor.view(-1) for tensor in values]
    numel = flat[0].numel()
    for start in range(0, numel, chunk_values):
        end = min(start + chunk_values, numel)
        blocks = slice(start // BLOCKSIZE, absmax_count(end))
        yield [tensor[start:end] for tensor in flat], [scales[blocks] for scales in absmax]


def adamw_step_8bit(
    param: Tensor, grad: Tensor, state: dict[str, Any], lr: float, beta1: float, beta2: float, eps: float,
    weight_decay: float, chunk_values: int | None = None,
) -> None:
    """One AdamW step of ``param`` with 8-bit blockwise moments, by bitsandbytes' fused update.

    Same update as ``torch.optim.AdamW`` (decoupled weight decay first), computed in float32 from
    the dequantised moments, which are then re-quantised in place. On the CPU a contiguous
    ``param`` is stepped in chunks of ``chunk_values`` (default :data:`CHUNK_VALUES`) consecutive values, each a call of the same
    update on whole blocks: the update is elementwise and the quantisation blockwise, so the result
    is bit for bit that of one call on the whole tensor (tests/test_quant.py checks it).
    """
    import bitsandbytes.functional as bnb_functional

    state["step"] += 1
    step = int(state["step"].item())
    values = [param, grad.contiguous(), state["exp_avg_codes"], state["exp_avg_sq_codes"]]
    absmax = [state["exp_avg_absmax"], state["exp_avg_sq_absmax"]]
    whole = param.device.type != "cpu" or not param.is_contiguous()
    for (param_part, grad_part, exp_avg_codes, exp_avg_sq_codes), (exp_avg_absmax, exp_avg_sq_absmax) in (
        [(values, absmax)] if whole else blockwise_chunks(values, absmax, CHUNK_VALUES if chunk_values is None else chunk_values)
    ):
        bnb_functional.optimizer_update_8bit_blockwise(
            "adam", grad_part, param_part, exp_avg_codes, exp_avg_sq_codes,
            beta1, beta2, 0.0, 0.0, eps, step, lr,
            dynamic_map(True, param.device), dynamic_map(False, param.device),
            exp_avg_absmax, exp_avg_sq_absmax, weight_decay=weight_decay,
        )
