"""Helpers shared by several test files (tests import them from here, never from another test file or from
``benchmarks``): tiny models, the terms of a weight update, a recorder of host reads, checkpoint round trips,
the adapter tests' table, the Hugging Face Trainer's tiny setup and spawned gloo jobs."""

from __future__ import annotations

import datetime
import io
import os
import socket
import time
from typing import Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from galore_plus.adapters import adapter_parameters
from galore_plus.step.apply import LowRankTerm, ScaledGradient

# ---------------------------------------------------------------- tiny models


class TinyNet(nn.Module):
    """A right-side (48 x 24) and a left-side (24 x 48) projected weight, a bias and a norm."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(24, 48)
        self.norm = nn.LayerNorm(48)
        self.down = nn.Linear(48, 24, bias=False)

    def forward(self, x):
        return self.down(torch.tanh(self.norm(self.up(x))))


# ---------------------------------------------------------------- weight updates


def terms_of(m, n, rank, side, factor_kind, grad_dtype, generator):
    """A low-rank term, a scaled gradient (factor 0-d, per row or per column) and their float64 sum."""
    basis = torch.randn((m, rank) if side == "left" else (rank, n), generator=generator)
    low_rank = torch.randn((rank, n) if side == "left" else (m, rank), generator=generator) / rank**0.5
    grad = torch.randn(m, n, generator=generator).to(grad_dtype)
    factor = {"tensor": torch.tensor(0.7), "row": torch.rand(m, 1, generator=generator) + 0.5,
              "column": torch.rand(1, n, generator=generator) + 0.5}[factor_kind]
    term = LowRankTerm(low_rank, basis, side)
    back = basis.double() @ low_rank.double() if side == "left" else low_rank.double() @ basis.double()
    return term, ScaledGradient(grad, factor), back, factor.double() * grad.double()


class HostReads(TorchDispatchMode):
    """Records every operation that reads a device value on the host, or would on a GPU."""

    READS = {"_local_scalar_dense", "item", "is_nonzero", "nonzero", "masked_select", "unique", "_unique2"}

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        indices = args[1] if name in ("index", "index_put", "index_put_") and len(args) > 1 else ()
        if name in self.READS or any(i is not None and i.dtype == torch.bool for i in indices):
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


# ---------------------------------------------------------------- checkpoints


def weights_only_round_trip(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """``{"model": ..., "optimizer": ...}`` state dicts as ``torch.load(weights_only=True)`` reads them back after
    ``torch.save``: copies, so training on afterwards does not change them."""
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def resumed(make: Callable[[], tuple[nn.Module, torch.optim.Optimizer]],
            saved: dict) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A fresh ``make()`` model and optimizer with the ``saved`` state dicts of :func:`weights_only_round_trip`."""
    model, optimizer = make()
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    return model, optimizer


def assert_same_parameters(first: nn.Module, second: nn.Module) -> None:
    """Every parameter of ``first`` equals the one of the same name in ``second``, bit for bit."""
    others = dict(second.named_parameters())
    for name, param in first.named_parameters():
        assert torch.equal(param, others[name]), name


# ---------------------------------------------------------------- adapters

ADAPTER_METHODS = ["lora", "dora", "vera", "dvora", "hydra", "dylora", "adalora"]

# The options a method needs to be added at all (AdaLoRA's schedule has no defaults for these).
ADAPTER_OPTIONS = {"adalora": {"target_rank": 1, "total_steps": 20}}

# Trainable parameters per adapted Linear(in, out) at rank r, as stated in docs/adapters.md.
ADAPTER_PARAMETER_COUNTS = {
    "lora": lambda r, i, o: r * (i + o),
    "dora": lambda r, i, o: r * (i + o) + o,
    "vera": lambda r, i, o: r + o,
    "dvora": lambda r, i, o: r + 2 * o,
    "hydra": lambda r, i, o: r * (i + 3 * o),
    "dylora": lambda r, i, o: r * (i + o),
    "adalora": lambda r, i, o: r * (i + o + 1),
}


class TinyLM(nn.Module):
    """A small model with a nested block, same-shape layers and an output head called lm_head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.block = nn.ModuleDict(
            {"q_proj": nn.Linear(8, 8), "v_proj": nn.Linear(8, 8, bias=False), "up": nn.Linear(8, 12)}
        )
        self.down = nn.Linear(12, 8)
        self.lm_head = nn.Linear(8, 11, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        h = h + self.block["q_proj"](h) * torch.sigmoid(self.block["v_proj"](h))
        h = h + self.down(torch.relu(self.block["up"](h)))
        return self.lm_head(h)


def make_model(seed: int = 0) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM()


def tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 11, (3, 5), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def randomize_adapters(model: nn.Module, seed: int = 2, scale: float = 0.5) -> None:
    """Add ``scale`` times Gaussian noise to every adapter parameter so that every branch contributes to the output."""
    generator = torch.Generator().manual_seed(seed)
    for p in adapter_parameters(model):
        p.add_(scale * torch.randn(p.shape, generator=generator, dtype=p.dtype))


def linear64(in_features: int, out_features: int, bias: bool = True, seed: int = 3) -> nn.Linear:
    """A float64 ``nn.Linear`` with seeded random weights, for the dense references."""
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias).double()


# ---------------------------------------------------------------- Hugging Face Trainer (needs transformers)

MAX_STEPS = 6
STOP_AT = 3


def tiny_llama() -> nn.Module:
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def tiny_dataset() -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    rows = torch.randint(0, 64, (16, 8), generator=generator)
    return [{"input_ids": row, "labels": row} for row in rows]


def stop_after(step: int):
    """A ``transformers.TrainerCallback`` that interrupts training after ``step`` (its checkpoint is still written)."""
    import transformers

    class StopAt(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step:
                control.should_training_stop = True
            return control

    return StopAt()


# Distributed jobs: spawned gloo processes, each job bounded in time. The timeout is a hang detector, not a speed
# limit: a job takes seconds, 600 s is over a hundred times that, so a busy machine does not trip it.
JOB_TIMEOUT_SECONDS = 600


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_job(worker: Callable, out_dir, world_size: int = 2) -> None:
    """Run ``worker(rank, port, out_dir, world_size)`` on ``world_size`` spawned processes; fail after the timeout."""
    context = mp.start_processes(
        worker, args=(free_port(), str(out_dir), world_size), nprocs=world_size, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + JOB_TIMEOUT_SECONDS
    while not context.join(timeout=max(deadline - time.monotonic(), 0.1)):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"distributed job did not finish within {JOB_TIMEOUT_SECONDS} s: a hang")


def init_gloo(rank: int, port: int, world_size: int) -> None:
    """One thread, and this process's rank of a gloo process group on 127.0.0.1:``port``."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=JOB_TIMEOUT_SECONDS),
    )


def finish_gloo() -> None:
    """Wait for every rank, tear the process group down and exit without interpreter teardown.

    With torch 2.13 a rank rarely (about 1 job in 15 here) aborted at exit with "terminate called
    without an active exception" after its results were saved: gloo objects still referenced by
    DTensors and device meshes were destroyed during interpreter teardown. ``os._exit`` skips it.
    """
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)
