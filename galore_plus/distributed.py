"""GaLore+ steps of weights sharded by FSDP2 (``fully_shard``): DTensor parameters split by rows.

A weight W (m, n) sharded on dim 0 lives as rows [start, start + rows) on each rank, with its
gradient reduce-scattered the same way. One step of such a weight:

* refresh (1 step in ``update_proj_gap``): every rank computes the same basis with the
  single-process code, from the same float32 gradient rows, so the basis equals the one a single
  process would compute from the same gradient. ``cross_head`` reads only ceil(rank / head_dim)
  chosen heads' rows: just those rows are summed over ranks (each rank contributes the ones it
  owns, zeros elsewhere, so the sum is exact). ``svd`` and ``randomized`` need the whole matrix
  (their subspace depends on every row), so the full gradient is all-gathered. The basis is small
  (r x n or m x r) and kept whole, unsharded, on every rank.
* right (input) side, Q (r, n): each rank projects its own rows, R_local = G_local Q^T
  (rows x r), and keeps the moments of those rows, a DTensor sharded like the weight; no
  communication besides the refresh.
* left (output) side, P (m, r): R = P^T G = sum over ranks of P_rows^T G_local, so the (r, n)
  low-rank gradient is all-reduced every step; its moments are replicated on every rank.
* update: W_local <- W_local (1 - lr wd) - lr scale (N_local Q | P_rows N), on local rows only.

Only a 1-D device mesh with ``Shard(0)`` placement is handled; other shardings, ``transposed``
weights, residuals and 8-bit moments raise ``NotImplementedError`` rather than giving wrong results.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

from .dispatch import lowrank_adam_direction
from .finite import all_finite
from .group_options import group_label
from .projectors import basis_generator, cross_head_choice, group_num_heads, project, projection_side, due_refresh_index
from .update import apply_lowrank_update

if TYPE_CHECKING:
    from .optimizer import GaLorePlusAdamW

if dist.is_available():
    from torch.distributed.tensor import DTensor, Shard
else:
    DTensor = None


def is_sharded(param: Tensor) -> bool:
    """Whether ``param`` is a DTensor (an FSDP2 or tensor-parallel parameter)."""
    return DTensor is not None and isinstance(param, DTensor)


def chunk_rows(m: int, world_size: int, index: int) -> tuple[int, int]:
    """(first row, row count) of shard ``index`` of m rows split like ``torch.chunk`` (and FSDP2).

    ceil(m / world_size) rows per shard; the last shards may have fewer rows, or none.
    """
    chunk = -(-m // world_size)
    start = min(index * chunk, m)
    return start, min(chunk, m - start)


def local_rows(param: DTensor, label: str) -> tuple[int, int]:
    """(first row, row count) of this rank's shard of a weight sharded on dim 0 of a 1-D mesh."""
    if param.device_mesh.ndim != 1 or tuple(param.placements) != (Shard(0),):
        raise NotImplementedError(
            f"{label}, key 'rank': a projected DTensor weight must be sharded as (Shard(0),) on a 1-D device mesh "
            f"(FSDP2 fully_shard), got placements {tuple(param.placements)} on a {param.device_mesh.ndim}-D mesh"
        )
    start, rows = chunk_rows(param.shape[0], param.device_mesh.size(), param.device_mesh.get_local_rank())
    if param.to_local().shape[0] != rows:
        raise NotImplementedError(f"{label}, key 'rank': a shard of {param.to_local().shape[0]} rows does not follow "
                                  f"torch.chunk row sharding ({rows} rows expected)")
    return start, rows


def _local(tensor: Tensor) -> Tensor:
    return tensor.to_local() if is_sharded(tensor) else tensor


def _row_sharded_zeros(like: DTensor, rows: int, columns: int, full_rows: int) -> DTensor:
    """Zeros of global shape (full_rows, columns), sharded on rows exactly like ``like``."""
    local = torch.zeros(rows, columns, device=like.to_local().device)
    return DTensor.from_local(local, like.device_mesh, [Shard(0)], run_check=False,
                              shape=(full_rows, columns), stride=(columns, 1))


def basis_gradient(
    param: DTensor, group: dict[str, Any], seed: int, position: int, refresh_index: int, start: int, rows: int
) -> tuple[Tensor, dict[str, Any]]:
    """The float32 gradient a refresh reads, and the group options to compute the basis from it.

    ``cross_head``: the chosen heads' rows only, stacked in head order, as a gradient of that many
    heads; the basis code then reads all of them, in the same order and with the same generator,
    and returns the basis it would have computed from the whole gradient. Other projectors: the
    whole gradient, all-gathered.
    """
    if group["projector"] != "cross_head":
        return param.grad.full_tensor().float(), group
    m, n = param.shape
    num_heads = group_num_heads(group, m)
    head_dim = m // num_heads
    local_grad = param.grad.to_local()
    generator = basis_generator(seed, position, refresh_index, local_grad.device)
    heads = cross_head_choice(num_heads, head_dim, group["rank"], generator)
    wanted = (heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1).to(local_grad.device)
    owned = (wanted >= start) & (wanted < start + rows)
    head_grad = torch.zeros(wanted.numel(), n, device=local_grad.device)
    head_grad[owned] = local_grad[wanted[owned] - start].float()
    dist.all_reduce(head_grad, group=param.device_mesh.get_group())
    return head_grad, {**group, "num_heads": heads.numel(), "head_dim": None}


def _check_supported(optimizer: GaLorePlusAdamW, group: dict[str, Any], label: str) -> None:
    if group.get("residual_ratio", 0.0) > 0:
        raise NotImplementedError(f"{label}, key 'residual_ratio': residuals of sharded (DTensor) weights are not "
                                  "implemented; use residual_ratio=0 with FSDP2")
    if group["transposed"]:
        raise NotImplementedError(f"{label}, key 'transposed': a sharded weight stored (in, out) is sharded on its input "
                                  "side; only row-sharded nn.Linear-layout weights are implemented")
    if getattr(optimizer, "optim_bits", 32) != 32:
        raise NotImplementedError(f"{label}: 8-bit moments of sharded (DTensor) weights are not implemented; "
                                  "use optim_bits=32 with FSDP2")


def step_sharded_weight(
    optimizer: GaLorePlusAdamW, param: DTensor, group: dict[str, Any], group_index: int, position: int
) -> None:
    """One GaLore+ step of a row-sharded weight (see the module docstring); collective over its mesh."""
    label = group_label(group, group_index)
    _check_supported(optimizer, group, label)
    start, rows = local_rows(param, label)
    process_group = param.device_mesh.get_group()
    m, n = param.shape
    state = optimizer.state[param]
    step = state.get("step", 0) + 1
    side = projection_side((m, n), group["proj_type"], group["projector"])
    refresh = due_refresh_index(step, group["update_proj_gap"])
    if refresh is not None:
        grad, options = basis_gradient(param, group, optimizer.seed, position, refresh, start, rows)
        state["projector"] = optimizer._refreshed_basis(grad, options, side, position, refresh, state.get("projector"))
    basis = state["projector"]
    local_basis = basis if side == "right" else basis[start:start + rows]
    local_grad = param.grad.to_local().float()
    low_rank = project(local_grad, local_basis, side)
    if side == "left":
        dist.all_reduce(low_rank, group=process_group)
    finite = all_finite(low_rank).to(torch.int32)
    dist.all_reduce(finite, op=dist.ReduceOp.MIN, group=process_group)
    if not bool(finite):
        optimizer._warn_once("grad", f"non-finite gradient in {label}: that weight's step was skipped on every rank "
                                     "(moments, weight and step count unchanged)")
        return
    if "exp_avg" not in state:
        rank = group["rank"]
        for key in ("exp_avg", "exp_avg_sq"):
            state[key] = _row_sharded_zeros(param, rows, rank, m) if side == "right" else torch.zeros_like(low_rank)
    state["step"] = step
    beta1, beta2 = group["betas"]
    direction = lowrank_adam_direction(low_rank, _local(state["exp_avg"]), _local(state["exp_avg_sq"]),
                                       step, beta1, beta2, group["eps"])
    apply_lowrank_update(param.to_local(), direction, local_basis, side, group["lr"], group["weight_decay"],
                         group["scale"])
