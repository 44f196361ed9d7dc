"""A projector and an update rule defined here, registered in the tables, run everywhere a built-in one runs.

The entries describe themselves (keys with defaults and checks, the rule's own state tensor), and nothing else in
the package is told about them: ``optimizer.step()``, per-layer steps, FSDP2 row shards (gloo, two processes),
the checkpoint check with a ``weights_only`` resume, the memory estimator and group validation read the tables.

* projector ``signed_orthonormal``: a seeded random orthonormal basis times ``basis_sign`` (+1 or -1), its own key;
  the update is invariant to the sign, the stored basis is not.
* update rule ``rank_normalised``: N divided per basis direction k by sqrt(d_k + eps), d_k an exponential average
  (``betas[1]``) of the mean square of N's row or column k over the whole weight, kept as the rule's own state tensor
  ``direction_ema`` of shape (rank,); p <- p (1 - lr wd) - lr scale (P N' | N' Q).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from torch import nn

from galore_plus import GaLorePlusAdamW
from galore_plus.group_keys import GroupKey, choice
from galore_plus.memory import estimate_memory
from galore_plus.per_layer import enable_per_layer_steps
from galore_plus.projectors import PROJECTORS
from galore_plus.projectors.base import Projector, no_row
from galore_plus.projectors.random import random_orthonormal_basis
from galore_plus.rules import UPDATE_RULES
from galore_plus.rules.base import UpdateInputs, UpdateRule
from galore_plus.state.tensors import StateTensor
from galore_plus.step.apply import LowRankTerm, apply_update
from support import finish_gloo, init_gloo, run_job

PROJECTOR, RULE = "signed_orthonormal", "rank_normalised"
EMA_KEY = "direction_ema"
EMA_EPS = 1e-12
STEPS, GAP, RANK = 6, 2, 3


def signed_orthonormal_basis(read, shape, group, side, generator, previous):
    """A random orthonormal basis from the seeded generator, times the group's ``basis_sign`` (``read`` has no rows)."""
    assert read.shape[-2] == 0
    return random_orthonormal_basis(shape, group["rank"], side, generator, read.device).mul_(group["basis_sign"])


def rank_normalised_update(inputs: UpdateInputs, state: dict, group: dict) -> None:
    """The rule of the module docstring; leaves weight and state unchanged where ``inputs.finite`` is False."""
    channel_dim = -1 if inputs.side == "left" else -2
    squares = inputs.direction.square().sum(channel_dim)
    if inputs.side == "right":   # N holds this process's rows: the sum over the whole weight
        squares = inputs.total(squares)
    channels = inputs.shape[-1] if inputs.side == "left" else inputs.shape[-2]
    previous = state.get(EMA_KEY, torch.zeros_like(squares))
    average = previous * group["betas"][1] + squares / channels * (1 - group["betas"][1])
    state[EMA_KEY] = torch.where(inputs.finite, average, previous)
    scaling = (average + EMA_EPS).rsqrt()
    scaled = inputs.direction * (scaling[:, None] if inputs.side == "left" else scaling)
    apply_update(inputs.weight, group["lr"] * group["scale"], 1.0 - group["lr"] * group["weight_decay"], inputs.finite,
                 low_rank=LowRankTerm(scaled, inputs.basis, inputs.side))


# It reads no gradient row (no_row): a refresh of a row-sharded weight sums a (0, n) tensor over ranks, no values.
ENTRY_PROJECTOR = Projector(signed_orthonormal_basis, rows=no_row,
                            keys={"basis_sign": GroupKey(1.0, choice((1.0, -1.0)))})
ENTRY_RULE = UpdateRule(rank_normalised_update,
                        state={EMA_KEY: StateTensor(lambda shape, group, side: (group["rank"],))})


def register() -> None:
    """Put the two entries into the tables (in a spawned process, where no fixture runs)."""
    PROJECTORS[PROJECTOR] = ENTRY_PROJECTOR
    UPDATE_RULES[RULE] = ENTRY_RULE


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(PROJECTORS, PROJECTOR, ENTRY_PROJECTOR)
    monkeypatch.setitem(UPDATE_RULES, RULE, ENTRY_RULE)


class TwoLayer(nn.Module):
    """An input-side (24 x 16) and an output-side (10 x 24) projected weight, with uneven row shards on 2 ranks."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(16, 24)
        self.second = nn.Linear(24, 10)

    def forward(self, x):
        return self.second(torch.tanh(self.first(x)))


def build_model() -> TwoLayer:
    torch.manual_seed(0)
    return TwoLayer()


def groups(model: TwoLayer, sign: float = 1.0) -> list[dict]:
    entry = {"rank": RANK, "update_proj_gap": GAP, "projector": PROJECTOR, "update_rule": RULE, "scale": 0.5}
    return [{"params": [model.first.weight, model.second.weight], **entry, "basis_sign": sign},
            {"params": [model.first.bias, model.second.bias]}]


def batch(rows: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    inputs, targets = torch.randn(16, 16, generator=generator), torch.randn(16, 10, generator=generator)
    return inputs[rows], targets[rows]


def loss_of(model: nn.Module, rows: slice = slice(None), scale: float = 1.0) -> torch.Tensor:
    inputs, targets = batch(rows)
    return (model(inputs) - targets).square().sum() / 16 * scale


def train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, rows: slice = slice(None),
          scale: float = 1.0) -> None:
    for _ in range(steps):
        optimizer.zero_grad()
        loss_of(model, rows, scale).backward()
        optimizer.step()


def reference_step(weight, grad, basis, side, moments, ema, step, lr, scale, betas, eps, decay):
    """One step of the registered entries in float64, from the stored basis: R, Adam's N, the rule's scaling."""
    low_rank = basis.T @ grad if side == "left" else grad @ basis.T
    exp_avg, exp_avg_sq = moments
    exp_avg.mul_(betas[0]).add_(low_rank, alpha=1 - betas[0])
    exp_avg_sq.mul_(betas[1]).add_(low_rank.square(), alpha=1 - betas[1])
    direction = (exp_avg / (1 - betas[0] ** step)) / ((exp_avg_sq / (1 - betas[1] ** step)).sqrt() + eps)
    channel_dim = 1 if side == "left" else 0
    ema.mul_(betas[1]).add_(direction.square().mean(channel_dim), alpha=1 - betas[1])
    scaled = direction / (ema + EMA_EPS).sqrt()[:, None] if side == "left" else direction / (ema + EMA_EPS).sqrt()
    update = basis @ scaled if side == "left" else scaled @ basis
    return weight * (1 - lr * decay) - lr * scale * update


def test_step_equals_a_float64_reference_of_the_entries_and_keeps_the_declared_state(registered):
    model = build_model()
    optimizer = GaLorePlusAdamW(groups(model), lr=1e-2, weight_decay=0.1)
    weight = model.first.weight   # (24, 16): the input side, basis Q (3, 16)
    reference = weight.detach().double().clone()
    moments = [torch.zeros(24, RANK, dtype=torch.float64) for _ in range(2)]
    ema = torch.zeros(RANK, dtype=torch.float64)
    for step in range(1, STEPS + 1):
        optimizer.zero_grad()
        loss_of(model).backward()
        grad = weight.grad.double().clone()
        optimizer.step()
        basis = optimizer.state[weight]["projector"].double()
        reference = reference_step(reference, grad, basis, "right", moments, ema, step, 1e-2, 0.5, (0.9, 0.999),
                                   1e-8, 0.1)
        # float32 products of a few dozen terms, over 6 steps of size lr: far below 1e-5 of the weights' size
        torch.testing.assert_close(weight.detach().double(), reference, rtol=0, atol=1e-5)
    state = optimizer.state[model.second.weight]   # (10, 24): the output side
    assert state[EMA_KEY].shape == (RANK,) and state[EMA_KEY].dtype == torch.float32
    assert state["projector"].shape == (10, RANK)
    torch.testing.assert_close(state[EMA_KEY].double(), state[EMA_KEY].double().clamp(min=0))


def test_the_projectors_own_key_reaches_it_and_a_stranger_group_refuses_it(registered):
    """``basis_sign`` flips the stored basis but not the update; a built-in projector's group refuses the key,
    naming the entry that reads it."""
    runs = {}
    for sign in (1.0, -1.0):
        model = build_model()
        optimizer = GaLorePlusAdamW(groups(model, sign), lr=1e-2)
        train(model, optimizer, 3)
        runs[sign] = model, optimizer
    (plus, plus_opt), (minus, minus_opt) = runs[1.0], runs[-1.0]
    torch.testing.assert_close(plus_opt.state[plus.first.weight]["projector"],
                               -minus_opt.state[minus.first.weight]["projector"], rtol=0, atol=0)
    torch.testing.assert_close(plus.first.weight, minus.first.weight, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match=f"key 'basis_sign': projector 'svd' .* read by projector '{PROJECTOR}'"):
        GaLorePlusAdamW([{"params": [nn.Parameter(torch.randn(8, 8))], "rank": 2, "projector": "svd",
                          "basis_sign": -1.0}])
    with pytest.raises(ValueError, match=r"key 'basis_sign': must be one of \(1.0, -1.0\)"):
        GaLorePlusAdamW(groups(build_model(), 2.0))


def test_per_layer_steps_equal_optimizer_step(registered):
    stepped, per_layer = build_model(), build_model()
    train(stepped, GaLorePlusAdamW(groups(stepped), lr=1e-2), STEPS)
    optimizer = GaLorePlusAdamW(groups(per_layer), lr=1e-2)
    enable_per_layer_steps(optimizer)
    train(per_layer, optimizer, STEPS)
    for (name, expected), actual in zip(stepped.named_parameters(), per_layer.parameters()):
        assert torch.equal(actual, expected), name


def test_checkpoint_resumes_bit_exact_with_weights_only_and_refuses_a_wrong_state_shape(registered, tmp_path):
    straight = build_model()
    train(straight, GaLorePlusAdamW(groups(straight), lr=1e-2), STEPS)
    resumed = build_model()
    optimizer = GaLorePlusAdamW(groups(resumed), lr=1e-2)
    train(resumed, optimizer, STEPS // 2)
    torch.save({"model": resumed.state_dict(), "optimizer": optimizer.state_dict()}, tmp_path / "checkpoint.pt")
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    resumed = build_model()
    resumed.load_state_dict(saved["model"])
    optimizer = GaLorePlusAdamW(groups(resumed), lr=1e-2)
    optimizer.load_state_dict(saved["optimizer"])
    train(resumed, optimizer, STEPS - STEPS // 2)
    for (name, expected), actual in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(actual, expected), name
    wrong = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["optimizer"]
    wrong["state"][0][EMA_KEY] = torch.zeros(RANK + 1)
    with pytest.raises(ValueError, match=f"state key '{EMA_KEY}': the checkpoint's tensor has shape \\({RANK + 1},\\)"):
        GaLorePlusAdamW(groups(build_model()), lr=1e-2).load_state_dict(wrong)


@pytest.mark.parametrize("optim_bits", [32, 8])
def test_memory_estimate_equals_the_allocated_state(registered, optim_bits):
    if optim_bits == 8:
        pytest.importorskip("bitsandbytes")
    model = build_model()
    optimizer = GaLorePlusAdamW(groups(model), lr=1e-2, optim_bits=optim_bits)
    train(model, optimizer, 2)
    allocated = sum(value.nbytes for state in optimizer.state.values() for value in state.values()
                    if isinstance(value, torch.Tensor))
    assert EMA_KEY in optimizer.state[model.first.weight]
    assert estimate_memory(groups(model), optim_bits=optim_bits).optimizer_state == allocated


# ---------------------------------------------------------------- FSDP2 row shards, 2 processes (gloo)

WORLD_SIZE = 2


def fsdp_worker(rank: int, port: int, out_dir: str, world_size: int) -> None:
    """Register the entries (no fixture runs in a spawned process), train the row-sharded model on this rank's half of
    the batch (the loss is scaled so that the reduced gradient is the whole batch's), save the whole weights."""
    from torch.distributed.fsdp import fully_shard

    register()
    init_gloo(rank, port, world_size)
    model = build_model()
    fully_shard(model)
    half = 16 // WORLD_SIZE
    train(model, GaLorePlusAdamW(groups(model), lr=1e-2), STEPS, slice(rank * half, (rank + 1) * half), WORLD_SIZE)
    torch.save({name: p.full_tensor().detach() for name, p in model.named_parameters()},
               os.path.join(out_dir, f"rank{rank}.pt"))
    finish_gloo()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
def test_fsdp2_row_shards_equal_the_single_process_run(registered, tmp_path):
    run_job(fsdp_worker, tmp_path, WORLD_SIZE)
    single = build_model()
    start = {name: p.detach().clone() for name, p in single.named_parameters()}
    train(single, GaLorePlusAdamW(groups(single), lr=1e-2), STEPS)
    for rank in range(WORLD_SIZE):
        sharded = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for name, expected in single.named_parameters():
            assert not torch.equal(expected.detach(), start[name]), name
            # the ranks sum their rows' parts of R (left side) and of the rule's squares (right side) in another
            # order than one process: float32 rounding, amplified by Adam's division over 6 steps
            torch.testing.assert_close(sharded[name], expected.detach(), rtol=1e-4, atol=1e-5)
