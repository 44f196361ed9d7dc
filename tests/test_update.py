"""Applying a low-rank update: p <- p (1 - lr wd) - lr scale (P N | N Q), against a float64 reference, in row chunks."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from galore_plus.update import apply_full_update, apply_lowrank_update

TRUE, FALSE = torch.tensor(True), torch.tensor(False)


def exact_update(param: torch.Tensor, a: torch.Tensor, b: torch.Tensor, decay: float, alpha: float) -> torch.Tensor:
    """decay p + alpha a b in float64 from the same inputs."""
    return param.double() * decay + alpha * (a.double() @ b.double())


def rounding_bound(param: torch.Tensor, a: torch.Tensor, b: torch.Tensor, exact: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per entry: one rounding to the weight's dtype plus float32 arithmetic on terms of this size."""
    terms = param.double().abs() + abs(alpha) * (a.double().abs() @ b.double().abs())
    return torch.finfo(param.dtype).eps * exact.abs() + 1e-6 * terms


@settings(max_examples=40, deadline=None, derandomize=True)
@given(m=st.integers(1, 70), n=st.integers(1, 40), rank=st.integers(1, 8), side=st.sampled_from(["left", "right"]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       chunk_values=st.sampled_from([None, 1, 50, 300]), weight_decay=st.sampled_from([0.0, 0.2]),
       seed=st.integers(0, 2**16))
def test_update_in_row_chunks_matches_the_float64_update(m, n, rank, side, dtype, chunk_values, weight_decay, seed):
    """Weights of every dtype, updated whole (float32) or through a float32 buffer of a few rows (others),
    are within one rounding of the float64 update; lr 0.5 makes the decay (10 %) and the product
    (about 50 % of a weight entry) far larger than the tolerance."""
    generator = torch.Generator().manual_seed(seed)
    basis = torch.randn((m, rank) if side == "left" else (rank, n), generator=generator)
    direction = torch.randn((rank, n) if side == "left" else (m, rank), generator=generator) / rank**0.5
    param = torch.randn(m, n, generator=generator).to(dtype)
    start = param.clone()
    lr, scale = 0.5, 1.0
    apply_lowrank_update(param, direction, basis, side, lr, weight_decay, scale, TRUE, block_values=chunk_values)
    a, b = (basis, direction) if side == "left" else (direction, basis)
    exact = exact_update(start, a, b, 1.0 - lr * weight_decay, -lr * scale)
    assert param.dtype == dtype
    assert not torch.equal(param, start)
    assert ((param.double() - exact).abs() <= rounding_bound(start, a, b, exact, -lr * scale)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("side", ["left", "right"])
def test_a_step_that_is_not_finite_leaves_the_weight_unchanged(side, dtype):
    """``finite`` False comes with a zero direction: neither the decay nor the product may change p."""
    generator = torch.Generator().manual_seed(1)
    m, n, rank = 23, 9, 3
    basis = torch.randn((m, rank) if side == "left" else (rank, n), generator=generator)
    direction = torch.zeros((rank, n) if side == "left" else (m, rank))
    param = torch.randn(m, n, generator=generator).to(dtype)
    start = param.clone()
    apply_lowrank_update(param, direction, basis, side, 0.5, 0.2, 1.0, FALSE, block_values=2 * n)
    assert torch.equal(param, start)
    apply_lowrank_update(param, direction, basis, side, 0.5, 0.2, 1.0, TRUE, block_values=2 * n)
    assert not torch.equal(param, start)


def test_a_transposed_bfloat16_weight_is_updated_through_its_view():
    """``transposed`` groups step ``param.t()``, a non-contiguous view: every row chunk is written back into it."""
    generator = torch.Generator().manual_seed(2)
    stored = torch.randn(16, 40, generator=generator).bfloat16()  # the parameter; its transpose (40, 16) is stepped
    basis, direction = torch.randn(4, 16, generator=generator), torch.randn(40, 4, generator=generator)
    start = stored.t().clone()
    apply_lowrank_update(stored.t(), direction, basis, "right", 0.5, 0.2, 1.0, TRUE, block_values=3 * 16)
    exact = exact_update(start, direction, basis, 0.9, -0.5)
    assert ((stored.t().double() - exact).abs() <= rounding_bound(start, direction, basis, exact, -0.5)).all()


@settings(max_examples=30, deadline=None, derandomize=True)
@given(m=st.integers(1, 60), n=st.integers(1, 30), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       block_values=st.sampled_from([None, 1, 50, 300]), weight_decay=st.sampled_from([0.0, 0.2]),
       seed=st.integers(0, 2**16))
def test_full_size_update_in_row_blocks_matches_the_float64_update(m, n, dtype, block_values, weight_decay, seed):
    """p (1 - lr wd) - lr scale U (Fira's full-size update) within one rounding of float64; a step that is not
    finite (NaN in U) leaves p unchanged bit for bit."""
    generator = torch.Generator().manual_seed(seed)
    param = torch.randn(m, n, generator=generator).to(dtype)
    update = torch.randn(m, n, generator=generator)
    start = param.clone()
    lr, scale = 0.5, torch.tensor(0.8)
    exact = start.double() * (1 - lr * weight_decay) - lr * 0.8 * update.double()
    terms = start.double().abs() + lr * 0.8 * update.double().abs()
    apply_full_update(param, update.clone(), lr, weight_decay, scale, TRUE, block_values=block_values)
    assert param.dtype == dtype and not torch.equal(param, start)
    assert ((param.double() - exact).abs() <= torch.finfo(dtype).eps * exact.abs() + 1e-6 * terms).all()
    skipped = start.clone()
    update[0, 0] = float("nan")
    apply_full_update(skipped, update, lr, weight_decay, scale, FALSE, block_values=block_values)
    assert torch.equal(skipped, start)
