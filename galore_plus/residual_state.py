"""The residual's part of one optimizer step: when I is chosen, the residual state, and writing p at I.

State of a weight with a residual (plain tensors and ints in ``optimizer.state[p]``):

* ``residual_row_ptr`` (m + 1,) and ``residual_col`` (|I|,): the index set I in CSR form;
* ``residual_exp_avg``, ``residual_exp_avg_sq`` (|I|,) float32: M_I, V_I ("exact") or dM, dV ("paper");
* ``residual_step``: c, the number of steps the residual has been applied.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .dispatch import residual_values
from .projectors import Side
from .residual import flat_index, residual_count, scatter_flat, select_residual_index

ResidualWrite = tuple[Tensor, Tensor]


def residual_update(
    param: Tensor, grad: Tensor, low_rank: Tensor, direction: Tensor, basis: Tensor, side: Side,
    state: dict[str, Any], group: dict[str, Any], step: int,
) -> ResidualWrite | None:
    """Run the residual part of step ``step`` (call after the low-rank moments are updated).

    Chooses I at the end of step max(k, 1) with k = ``residual_warmup``; for t > k returns
    (flat positions of I, new float32 weight values at I) to write after the low-rank update, else None.
    """
    count = residual_count(group["residual_ratio"], tuple(grad.shape))
    if count == 0:
        return None
    if "residual_col" not in state:
        if step < group["residual_warmup"]:
            return None
        row_ptr, col = select_residual_index(basis, state["exp_avg"], side, tuple(grad.shape), count)
        state["residual_row_ptr"], state["residual_col"] = row_ptr, col
        state["residual_exp_avg"] = torch.zeros(col.numel(), device=grad.device)
        state["residual_exp_avg_sq"] = torch.zeros(col.numel(), device=grad.device)
        state["residual_step"] = 0
    if step <= group["residual_warmup"]:
        return None
    state["residual_step"] += 1
    index = flat_index(state["residual_row_ptr"], state["residual_col"], grad.shape[1])
    beta1, beta2 = group["betas"]
    values = residual_values(
        param, grad, index, state["residual_exp_avg"], state["residual_exp_avg_sq"],
        basis, side, low_rank, state["exp_avg_sq"], direction,
        group["residual_mode"], step, state["residual_step"], beta1, beta2, group["eps"],
        group["lr"], group["weight_decay"], group["scale"],
    )
    return index, values


def write_residual(param: Tensor, write: ResidualWrite) -> None:
    """Overwrite p at I with the new values (rounded once to the weight's dtype)."""
    index, values = write
    scatter_flat(param, index, values.to(param.dtype))
