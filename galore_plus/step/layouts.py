"""Where a projected weight's rows live: the local layout, and FSDP2 row shards (DTensor split by rows).

Both implement :class:`galore_plus.step.weight_step.WeightLayout`, so every path runs the one step of
:func:`galore_plus.step.weight_step.step_projected_weight`. A weight W (m, n) sharded on dim 0 lives as
rows [start, start + rows) on each rank, with its gradient reduce-scattered the same way. Sharding
changes only this:

* refresh (1 step in ``update_proj_gap``): every rank computes the same basis with the
  single-process code, from the same float32 gradient rows, so the basis equals the one a single
  process would compute from the same gradient. A projector that reads only some rows
  (``cross_head``: ceil(rank / head_dim) chosen heads) gets just those, summed over ranks (each rank
  contributes the ones it owns, zeros elsewhere, so the sum is exact). ``svd`` and ``randomized``
  need the whole matrix (their subspace depends on every row), so the full gradient is
  all-gathered. The basis is small (r x n or m x r) and kept whole, unsharded, on every rank.
* right (input) side, Q (r, n): each rank projects its own rows, R_local = G_local Q^T
  (rows x r), and keeps the moments of those rows, a DTensor sharded like the weight; no
  communication besides the refresh.
* left (output) side, P (m, r): R = P^T G = sum over ranks of P_rows^T G_local, so the (r, n)
  low-rank gradient is all-reduced every step; its moments are replicated on every rank.
* finiteness: the step is skipped on every rank when it is not finite on one of them.
* update: W_local <- W_local (1 - lr wd) - lr scale (N_local Q | P_rows N), on local rows only.

Only a 1-D device mesh with ``Shard(0)`` placement is handled; other shardings, ``transposed``
weights, residuals (sparse and full-rank), APOLLO's update rule and 8-bit moments raise ``NotImplementedError``
rather than giving wrong results.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .shapes import Shape, Side, stepped_shape

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


def compute_gradient(grad: Tensor) -> Tensor:
    """The gradient a projected step computes with: float32 for a float64 weight (its basis and moments are
    float32, and the update is added to the float64 weight), else the gradient itself (bfloat16 is read a
    block of rows at a time)."""
    return grad.float() if grad.dtype == torch.float64 else grad


def single_process_total(value: Tensor) -> Tensor:
    """The sum over processes of a value computed from each one's rows, in a single process: the value itself."""
    return value


class LocalLayout:
    """A weight held whole by this process: a matrix (``transposed`` ones seen as their transpose), a stack of
    matrices (E, m, n) (each transposed for ``transposed``), or a convolution kernel (out, in, kh, kw) seen as
    the matrix (out, in kh kw), a view of the (contiguous) kernel."""

    def __init__(self, param: Tensor, transposed: bool):
        self.param, self.transposed = param, transposed
        self.shape: Shape = stepped_shape(param, transposed)
        self.device = param.device

    def stepped(self, tensor: Tensor) -> Tensor:
        """``tensor`` (the weight or its gradient) as the matrix or stack that is stepped; a view of the weight."""
        if tensor.dim() == 4:
            return tensor.view(tensor.shape[0], -1) if tensor is self.param else tensor.reshape(tensor.shape[0], -1)
        return tensor.mT if self.transposed else tensor

    def weight(self) -> Tensor:
        return self.stepped(self.param)

    def gradient(self) -> Tensor:
        return self.stepped(compute_gradient(self.param.grad))

    def read_rows(self, rows: Tensor | None) -> Tensor:
        grad = self.gradient()
        return (grad if rows is None else grad.index_select(-2, rows.to(grad.device))).float()

    def local_basis(self, basis: Tensor, side: Side) -> Tensor:
        return basis

    def reduce_low_rank(self, low_rank: Tensor, side: Side) -> Tensor:
        return low_rank

    def all_ranks(self, flag: Tensor) -> Tensor:
        return flag

    def moment_zeros(self, low_rank: Tensor, side: Side) -> Tensor:
        return torch.zeros_like(low_rank)

    def local(self, moment: Tensor) -> Tensor:
        return moment

    total = staticmethod(single_process_total)


class RowShardLayout:
    """A weight sharded by rows over a 1-D mesh (FSDP2 ``fully_shard``); collective over that mesh."""

    def __init__(self, param: DTensor, label: str):
        self.param = param
        self.start, self.rows = local_rows(param, label)
        self.shape: Shape = tuple(param.shape)
        self.device = param.to_local().device
        self.process_group = param.device_mesh.get_group()

    def weight(self) -> Tensor:
        return self.param.to_local()

    def gradient(self) -> Tensor:
        return compute_gradient(self.param.grad.to_local())

    def read_rows(self, rows: Tensor | None) -> Tensor:
        """The whole gradient all-gathered, or only ``rows``: each rank fills the ones it owns, then a sum."""
        if rows is None:
            return self.param.grad.full_tensor().float()
        local_grad = self.param.grad.to_local()
        wanted = rows.to(local_grad.device)
        owned = (wanted >= self.start) & (wanted < self.start + self.rows)
        gathered = torch.zeros(wanted.numel(), self.shape[1], device=local_grad.device)
        gathered[owned] = local_grad[wanted[owned] - self.start].float()
        dist.all_reduce(gathered, group=self.process_group)
        return gathered

    def local_basis(self, basis: Tensor, side: Side) -> Tensor:
        return basis if side == "right" else basis[self.start:self.start + self.rows]

    def reduce_low_rank(self, low_rank: Tensor, side: Side) -> Tensor:
        return low_rank if side == "right" else self.total(low_rank)

    def all_ranks(self, flag: Tensor) -> Tensor:
        agreed = flag.to(torch.int32)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=self.process_group)
        return agreed.bool()

    def moment_zeros(self, low_rank: Tensor, side: Side) -> Tensor:
        """Left side: replicated zeros. Right side: zeros of global shape (m, r) sharded like the weight."""
        if side == "left":
            return torch.zeros_like(low_rank)
        m, rank = self.shape[0], low_rank.shape[1]
        return DTensor.from_local(torch.zeros_like(low_rank), self.param.device_mesh, [Shard(0)], run_check=False,
                                  shape=(m, rank), stride=(rank, 1))

    def local(self, moment: Tensor) -> Tensor:
        return moment.to_local() if is_sharded(moment) else moment

    def total(self, value: Tensor) -> Tensor:
        """The sum over ranks (an all-reduce of a copy, on the device, no host read)."""
        summed = value.clone()
        dist.all_reduce(summed, group=self.process_group)
        return summed


def row_shard_layout(param: DTensor, group: dict[str, Any], label: str, optim_bits: int) -> RowShardLayout:
    """The layout of a sharded weight, or NotImplementedError naming the group key that is not supported."""
    if param.dim() != 2:
        raise NotImplementedError(f"{label}, key 'rank': a sharded (DTensor) weight of shape {tuple(param.shape)} is not "
                                  "a matrix; sharded stacks of experts and convolution kernels are not implemented "
                                  "(put them in a group without 'rank', or do not shard them)")
    if group.get("residual_ratio", 0.0) > 0:
        raise NotImplementedError(f"{label}, key 'residual_ratio': residuals of sharded (DTensor) weights are not "
                                  "implemented; use residual_ratio=0 with FSDP2")
    if group["transposed"]:
        raise NotImplementedError(f"{label}, key 'transposed': a sharded weight stored (in, out) is sharded on its input "
                                  "side; only row-sharded nn.Linear-layout weights are implemented")
    if optim_bits != 32:
        raise NotImplementedError(f"{label}: 8-bit moments of sharded (DTensor) weights are not implemented; "
                                  "use optim_bits=32 with FSDP2")
    return RowShardLayout(param, label)
