"""Norm-scaled full-rank residual: a dense float64 reference, the limiter, and parity with the ``fira`` package."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from galore_plus.full_rank_residual import (
    adam_bias_factor, limit_norm_growth, norm_scaled_update, residual_scaling, scaled_residual,
)
from galore_plus.lowrank_adam import lowrank_adam_direction
from galore_plus.projectors import project, projection_side, svd_basis


def reference_update(grad, low_rank, direction, basis, side, alpha):
    """U = alpha P N + phi (G - alpha P R), column by column (output side) or row by row (input side)."""
    if side == "right":
        return reference_update(grad.t(), low_rank.t(), direction.t(), basis.t(), "left", alpha).t()
    update = torch.empty_like(grad)
    for j in range(grad.shape[1]):
        phi = direction[:, j].norm() / (low_rank[:, j].norm() + 1e-8)
        update[:, j] = alpha * basis @ direction[:, j] + phi * (grad[:, j] - alpha * basis @ low_rank[:, j])
    return update


@settings(max_examples=25, deadline=None, derandomize=True)
@given(m=st.integers(2, 12), n=st.integers(2, 12), data=st.data(), seed=st.integers(0, 2**16),
       side=st.sampled_from(["left", "right"]), alpha=st.sampled_from([1.0, 0.25, 2.0]))
def test_update_without_limiter_equals_dense_float64_reference(m, n, data, seed, side, alpha):
    rank = data.draw(st.integers(1, min(m, n)))
    generator = torch.Generator().manual_seed(seed)
    grad = torch.randn(m, n, generator=generator, dtype=torch.float64)
    basis = svd_basis(grad + 0.3 * torch.randn(m, n, generator=generator, dtype=torch.float64), rank, side)
    low_rank = project(grad, basis, side)
    direction = low_rank.sign() * torch.rand(low_rank.shape, generator=generator, dtype=torch.float64)
    update, norm = norm_scaled_update(grad, low_rank, direction, basis, side, alpha, None, 1.01, 0.5)
    torch.testing.assert_close(update, reference_update(grad, low_rank, direction, basis, side, alpha),
                               rtol=1e-10, atol=1e-12)
    term = scaled_residual(grad, low_rank, direction, basis, side, alpha)
    torch.testing.assert_close(norm, term.norm() / 0.5, rtol=1e-12, atol=0)


def test_scaling_is_per_column_on_the_output_side_and_per_row_on_the_input_side():
    direction = torch.tensor([[3.0, 0.0], [4.0, 1.0]])
    low_rank = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    torch.testing.assert_close(residual_scaling(direction, low_rank, "left"),
                               torch.tensor([[5.0 / (1 + 1e-8), 1.0 / (2 + 1e-8)]]))
    torch.testing.assert_close(residual_scaling(direction, low_rank, "right"),
                               torch.tensor([[3.0 / (math.sqrt(5) + 1e-8)], [math.sqrt(17) / 1e-8]]))


def test_limiter_caps_growth_per_step_and_stores_the_limited_norm():
    term = torch.full((3, 4), 1.0)                               # norm 2 * sqrt(3)
    limited, stored = limit_norm_growth(term.clone(), torch.tensor(1.0), 1.01, 2.0)
    assert float(stored) == pytest.approx(1.01, rel=1e-6)       # measured norm sqrt(12) / 2 capped at 1.01 * 1
    torch.testing.assert_close(limited.norm() / 2.0, torch.tensor(1.01))
    unchanged, stored = limit_norm_growth(term.clone(), torch.tensor(100.0), 1.01, 2.0)
    torch.testing.assert_close(unchanged, term)                  # shrinking is never limited
    torch.testing.assert_close(stored, term.norm() / 2.0)
    free, _ = limit_norm_growth(term.clone(), torch.tensor(1.0), None, 2.0)
    torch.testing.assert_close(free, term)


def test_bias_factor_is_adam_bias_correction_of_m_over_sqrt_v():
    assert adam_bias_factor(1, 0.9, 0.999) == pytest.approx(math.sqrt(0.001) / 0.1)
    assert adam_bias_factor(10_000, 0.9, 0.999) == pytest.approx(1.0, abs=1e-4)


def gradient_sequence(shape, steps, seed):
    """Low-rank-plus-noise gradients whose size changes from step to step, so the limiter acts."""
    generator = torch.Generator().manual_seed(seed)
    m, n = shape
    left, right = torch.randn(m, 3, generator=generator), torch.randn(3, n, generator=generator)
    sizes = [1.0, 1.5, 0.7, 3.0, 1.0, 4.0, 0.5, 2.0, 6.0, 1.0][:steps]
    return [size * (left @ right + 0.5 * torch.randn(m, n, generator=generator)) for size in sizes]


def our_weights(weight, grads, rank, gap, lr, limit, betas=(0.9, 0.999)):
    """Our functions, composed as the optimizer composes them (eps = 0, no weight decay, scale 1)."""
    weight = weight.clone()
    side = projection_side(tuple(weight.shape), "std", "svd")
    exp_avg = exp_avg_sq = basis = norm = None
    history = []
    for step, grad in enumerate(grads, start=1):
        if (step - 1) % gap == 0:
            basis = svd_basis(grad, rank, side)
        low_rank = project(grad, basis, side)
        if exp_avg is None:
            exp_avg, exp_avg_sq = torch.zeros_like(low_rank), torch.zeros_like(low_rank)
        direction = lowrank_adam_direction(low_rank, exp_avg, exp_avg_sq, step, *betas, 0.0)
        update, norm = norm_scaled_update(grad, low_rank, direction, basis, side, 1.0, norm, limit,
                                          adam_bias_factor(step, *betas))
        weight.sub_(update, alpha=lr)
        history.append(weight.clone())
    return history


@pytest.mark.parametrize("shape", [(20, 12), (12, 20)])
def test_equals_fira_adamw_on_the_same_gradients(shape):
    fira = pytest.importorskip("fira")
    grads = gradient_sequence(shape, 10, seed=3)
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(4))
    param = torch.nn.Parameter(weight.clone())
    optimizer = fira.FiraAdamW([{"params": [param], "rank": 4, "update_proj_gap": 3, "alpha": 1.0, "proj_type": "std"}],
                               lr=0.01, eps=0.0, weight_decay=0.0, no_deprecation_warning=True)
    theirs = []
    for grad in grads:
        param.grad = grad.clone()
        optimizer.step()
        theirs.append(param.detach().clone())
    ours = our_weights(weight, grads, rank=4, gap=3, lr=0.01, limit=1.01)
    for step, (a, b) in enumerate(zip(ours, theirs), start=1):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"step {step}")
    moved = (theirs[-1] - weight).abs().max()
    without_limiter = our_weights(weight, grads, rank=4, gap=3, lr=0.01, limit=None)[-1]
    assert float(moved) > 1e-2
    assert float((without_limiter - theirs[-1]).abs().max()) > 100 * 1e-6   # the limiter acted in this run
