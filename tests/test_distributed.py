"""GaLorePlusAdamW under torch.distributed: 2 CPU processes, gloo backend, each job bounded in time."""

from __future__ import annotations

import datetime
import os
import socket
import time
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from galore_plus import GaLorePlusAdamW
from galore_plus.group_options import PROJECTED_GROUP_DEFAULTS

WORLD_SIZE = 2
JOB_TIMEOUT_SECONDS = 120
STEPS = 6
GAP = 2
GLOBAL_BATCH = 8

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_job(worker: Callable, out_dir: Path, *args) -> None:
    """Run ``worker(rank, port, out_dir, *args)`` on WORLD_SIZE spawned processes; fail after the timeout."""
    context = mp.start_processes(
        worker, args=(free_port(), str(out_dir), *args), nprocs=WORLD_SIZE, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + JOB_TIMEOUT_SECONDS
    while not context.join(timeout=max(deadline - time.monotonic(), 0.1)):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"distributed job did not finish within {JOB_TIMEOUT_SECONDS} s")


def init_gloo(rank: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE,
        timeout=datetime.timedelta(seconds=JOB_TIMEOUT_SECONDS),
    )


class TwoLayer(nn.Module):
    """Attention-like input projection (4 heads) and an output projection."""

    def __init__(self):
        super().__init__()
        self.query = nn.Linear(16, 32)
        self.out = nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.query(x)))


def build_model() -> TwoLayer:
    torch.manual_seed(0)
    return TwoLayer()


def param_groups(model: TwoLayer) -> list[dict]:
    cross_head = dict(rank=4, update_proj_gap=GAP, projector="cross_head", num_heads=4)
    if "residual_ratio" in PROJECTED_GROUP_DEFAULTS:
        cross_head.update(residual_ratio=0.25, residual_warmup=1)
    return [
        {"params": [model.query.weight], **cross_head},
        {"params": [model.out.weight], "rank": 4, "update_proj_gap": GAP, "projector": "randomized"},
        {"params": [model.query.bias, model.out.bias]},
    ]


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(GLOBAL_BATCH, 16, generator=generator), torch.randn(GLOBAL_BATCH, 16, generator=generator))
            for _ in range(STEPS)]


def train(model: nn.Module, optimizer: torch.optim.Optimizer, rows: slice) -> None:
    for x, y in batches():
        nn.functional.mse_loss(model(x[rows]), y[rows]).backward()
        optimizer.step()
        optimizer.zero_grad()


def single_process_reference() -> dict[str, torch.Tensor]:
    model = build_model()
    train(model, GaLorePlusAdamW(param_groups(model), lr=1e-2, seed=3), slice(None))
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def ddp_worker(rank: int, port: int, out_dir: str) -> None:
    init_gloo(rank, port)
    model = build_model()
    ddp = nn.parallel.DistributedDataParallel(model)
    optimizer = GaLorePlusAdamW(param_groups(model), lr=1e-2, seed=3)
    share = GLOBAL_BATCH // WORLD_SIZE
    train(ddp, optimizer, slice(rank * share, (rank + 1) * share))
    torch.save({name: p.detach() for name, p in model.named_parameters()}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_ddp_ranks_end_bit_identical_and_equal_the_single_process_run(tmp_path):
    run_job(ddp_worker, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD_SIZE)]
    reference = single_process_reference()
    initial = dict(build_model().named_parameters())
    for name, expected in reference.items():
        assert torch.equal(ranks[0][name], ranks[1][name]), name
        torch.testing.assert_close(ranks[0][name], expected, rtol=1e-4, atol=1e-5)
        assert not torch.equal(expected, initial[name]), name
