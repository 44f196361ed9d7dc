"""Gradient memory of DDP with and without per-layer steps (2 CPU processes, gloo).

    python -m benchmarks.bench_ddp_per_layer                  # 8 Linear(512, 512) layers, 1 MiB buckets

For ordinary DDP and for ``enable_per_layer_steps(optimizer, ddp_model=ddp)``, each with
``gradient_as_bucket_view`` False and True, rank 0 prints the bytes of DDP's gradient buckets
(recorded in the communication hook, third iteration) and the peak bytes of gradients held outside
those buckets during backward (sampled after every gradient accumulation and at the end of backward).
"""

import argparse
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

import galore_plus.per_layer as per_layer
from galore_plus import GaLorePlusAdamW

MIB = 2**20


def gradient_bytes_outside(model: nn.Module, bucket_storages: set[int]) -> int:
    """Bytes of the distinct gradient storages of ``model`` that are not DDP bucket buffers."""
    storages = {}
    for param in model.parameters():
        grad = param.grad
        if grad is None or isinstance(grad, per_layer.ConsumedGradient):
            continue
        storage = grad.untyped_storage()
        if storage.data_ptr() not in bucket_storages:
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def measure(layers: int, width: int, per_layer_steps: bool, bucket_view: bool) -> tuple[int, int, int]:
    """(parameter bytes, bucket bytes, peak gradient bytes outside the buckets) of this rank."""
    bucket_storages: set[int] = set()
    bucket_bytes: dict[int, int] = {}

    def recording_allreduce(
        process_group: dist.ProcessGroup, bucket: dist.GradBucket
    ) -> torch.futures.Future[torch.Tensor]:
        bucket_storages.add(bucket.buffer().untyped_storage().data_ptr())
        bucket_bytes[bucket.buffer().untyped_storage().data_ptr()] = bucket.buffer().nbytes
        return allreduce_hook(process_group, bucket)

    per_layer.allreduce_hook = recording_allreduce
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(layers)])
    ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=1.0, gradient_as_bucket_view=bucket_view)
    optimizer = GaLorePlusAdamW([{"params": list(model.parameters()), "rank": 32, "update_proj_gap": 50}], lr=1e-3)
    if per_layer_steps:
        per_layer.enable_per_layer_steps(optimizer, ddp_model=ddp)
    else:
        ddp.register_comm_hook(None, recording_allreduce)
    peak = 0

    def sample(_param: torch.Tensor | None = None) -> None:
        nonlocal peak
        peak = max(peak, gradient_bytes_outside(model, bucket_storages))

    for param in model.parameters():
        param.register_post_accumulate_grad_hook(sample)
    x = torch.randn(64, width)
    for _ in range(3):  # DDP rebuilds its buckets after the first iteration
        peak = 0
        bucket_bytes.clear()
        ddp(x).square().mean().backward()
        sample()
        optimizer.step()
        optimizer.zero_grad()
    per_layer.allreduce_hook = allreduce_hook
    return sum(p.nbytes for p in model.parameters()), sum(bucket_bytes.values()), peak


def worker(rank: int, rendezvous: str, layers: int, width: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    for per_layer_steps in (False, True):
        for bucket_view in (False, True):
            params, buckets, peak = measure(layers, width, per_layer_steps, bucket_view)
            if rank == 0:
                mode = "per-layer" if per_layer_steps else "ordinary"
                print(f"{mode:9s} gradient_as_bucket_view={bucket_view!s:5s}: "
                      f"parameters {params / MIB:.2f} MiB, DDP buckets {buckets / MIB:.2f} MiB, "
                      f"peak gradients outside the buckets {peak / MIB:.2f} MiB", flush=True)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=512)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        mp.spawn(worker, args=(os.path.join(directory, "rendezvous"), args.layers, args.width), nprocs=2)


if __name__ == "__main__":
    main()
