"""Norm-scaled full-rank residual: a dense float64 reference, the limiter, and parity with the ``fira`` package."""

import math
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from galore_plus.rules.fira import fira_update, weighted_square_total
from galore_plus.rules.norms import adam_bias_factor, channel_norm_ratio, norm_growth_divisor
from galore_plus.rules.adam import lowrank_adam_direction
from galore_plus.projectors import projection_side
from galore_plus.projectors.svd import svd_basis
from galore_plus.step.projection import project
from galore_plus.step.row_blocks import channel_square_sums
from galore_plus.step.apply import LowRankTerm, ScaledGradient, apply_update


def reference_update(grad, low_rank, direction, basis, side, alpha, previous, limit, bias_factor):
    """(U = alpha P N + S / divisor, stored norm) in float64, column by column (output side) or row by row (input
    side), S = phi (G - alpha P R) formed whole and the limiter applied to its norm."""
    if side == "right":
        update, stored = reference_update(grad.t(), low_rank.t(), direction.t(), basis.t(), "left", alpha, previous,
                                          limit, bias_factor)
        return update.t(), stored
    residual = torch.empty_like(grad)
    for j in range(grad.shape[1]):
        phi = direction[:, j].norm() / (low_rank[:, j].norm() + 1e-8)
        residual[:, j] = phi * (grad[:, j] - alpha * basis @ low_rank[:, j])
    measured = float(residual.norm()) / bias_factor
    divisor = 1.0 if previous is None else max(measured / (previous + 1e-8), limit) / limit
    return alpha * basis @ direction + residual / divisor, measured / divisor


def formed_update(grad, factor, low_rank, block_values):
    """The update c G + P X that :func:`apply_update` adds, read off a zero weight (step size -1, no decay)."""
    update = torch.zeros(grad.shape, dtype=torch.float64)
    apply_update(update, -1.0, 1.0, torch.tensor(True), low_rank=low_rank, gradient=ScaledGradient(grad, factor),
                 block_values=block_values)
    return update


@settings(max_examples=30, deadline=None, derandomize=True)
@given(m=st.integers(2, 12), n=st.integers(2, 12), data=st.data(), seed=st.integers(0, 2**16),
       side=st.sampled_from(["left", "right"]), alpha=st.sampled_from([1.0, 0.25, 2.0]),
       previous=st.sampled_from([None, 0.05, 1e6]), block_values=st.sampled_from([None, 1, 7, 30]))
def test_update_equals_dense_float64_reference(m, n, data, seed, side, alpha, previous, block_values):
    """c G + P X (formed a few rows at a time) is alpha P N + S with S formed whole; the limiter acts (previous
    0.05), does not (1e6) or has nothing to compare with (None); the stored norm is the limited one."""
    rank = data.draw(st.integers(1, min(m, n)))
    generator = torch.Generator().manual_seed(seed)
    grad = torch.randn(m, n, generator=generator, dtype=torch.float64)
    basis = svd_basis(grad + 0.3 * torch.randn(m, n, generator=generator, dtype=torch.float64), rank, side)
    low_rank = project(grad, basis, side)
    direction = low_rank.sign() * torch.rand(low_rank.shape, generator=generator, dtype=torch.float64)
    previous_norm = None if previous is None else torch.tensor(previous, dtype=torch.float64)
    factor, term, stored = fira_update(channel_square_sums(grad, side == "left", block_values), low_rank, low_rank,
                                       direction, basis, side, alpha, previous_norm, 1.01, 0.5)
    expected, expected_norm = reference_update(grad, low_rank, direction, basis, side, alpha, previous, 1.01, 0.5)
    torch.testing.assert_close(formed_update(grad, factor, term, block_values), expected, rtol=1e-10, atol=1e-12)
    assert math.isclose(float(stored), expected_norm, rel_tol=1e-10, abs_tol=1e-12)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(m=st.integers(1, 20), n=st.integers(1, 20), rank=st.integers(1, 4), side=st.sampled_from(["left", "right"]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]), factor_kind=st.sampled_from(
           ["one", "tensor", "channel"]), block_values=st.sampled_from([None, 1, 10, 60]), seed=st.integers(0, 2**16))
def test_weighted_square_total_equals_that_of_the_formed_matrix(m, n, rank, side, dtype, factor_kind, block_values,
                                                                seed):
    """sum_j w_j ||c G_j + back-projection of X_j||^2 (columns on the left side, rows on the right) from G's square
    sums and low-rank terms, for any basis (not orthonormal here), against the matrix formed in float64."""
    generator = torch.Generator().manual_seed(seed)
    grad = torch.randn(m, n, generator=generator).to(dtype)
    wide = torch.float64 if dtype == torch.float64 else torch.float32           # the basis's dtype in the optimizer
    basis = torch.randn((m, rank) if side == "left" else (rank, n), generator=generator, dtype=wide)
    low_rank = torch.randn((rank, n) if side == "left" else (m, rank), generator=generator, dtype=wide)
    channel_shape = (1, n) if side == "left" else (m, 1)
    factor = {"one": 1.0, "tensor": torch.tensor(0.7),
              "channel": torch.rand(channel_shape, generator=generator) + 0.5}[factor_kind]
    weights = torch.rand(channel_shape, generator=generator)
    grad_squares = channel_square_sums(grad, side == "left", block_values)
    total = weighted_square_total(grad_squares, weights, factor, LowRankTerm(low_rank, basis, side),
                                  project(grad, basis, side))
    g, c = grad.double(), (factor.double() if isinstance(factor, torch.Tensor) else factor)
    formed = c * g + (basis.double() @ low_rank.double() if side == "left" else low_rank.double() @ basis.double())
    dim = 0 if side == "left" else 1
    assert grad_squares.shape == channel_shape and total.dim() == 0 and total.dtype == torch.float64
    # positive terms: a float32 square and sum of m values is within gamma_{m+1} of the exact sum (float64: far inside)
    torch.testing.assert_close(grad_squares, g.square().sum(dim, keepdim=True), rtol=gamma(m + 1, torch.float32), atol=0)
    expected = (weights.double() * formed.square().sum(dim, keepdim=True)).sum()
    torch.testing.assert_close(total, expected, rtol=1e-5, atol=1e-5 * float((c * g).square().sum() + 1))


def small_residual_gradient(m: int, n: int, rank: int, share: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 G, float64 G) with ``share`` of G's energy outside a rank-``rank`` column space."""
    generator = torch.Generator().manual_seed(seed)
    core = torch.linalg.qr(torch.randn(m, rank, generator=generator, dtype=torch.float64))[0]
    core = core @ torch.randn(rank, n, generator=generator, dtype=torch.float64)
    noise = torch.randn(m, n, generator=generator, dtype=torch.float64)
    grad64 = core + noise * (share * core.square().sum() / noise.square().sum()).sqrt()
    return grad64.float(), grad64


def gamma(count: int, dtype: torch.dtype) -> float:
    """Higham's gamma_k = k u / (1 - k u): the relative error bound of a sum or dot product of k terms in ``dtype``,
    whatever the order of summation and whether products are fused (u: half the machine epsilon)."""
    unit = torch.finfo(dtype).eps / 2
    return count * unit / (1 - count * unit)


def output_side_error_budget(grad, basis, x, weights, parts):
    """(E, I, B) for sum_j w_j ||G_j + P X_j||^2 computed by :func:`weighted_square_total` from float32 G and P, the
    rows split into ``parts`` (one process each: its row slice, and the square sums and R it was given; the same
    tensors, as a matrix kernel need not round a product the same way twice), against that sum in exact arithmetic.

    The function computes exactly (in exact arithmetic) sum_p sum_j w_j (g~_pj + 2 X_j . R~_pj) + sum_j w_j X_j . M X_j,
    where g~ (each process's rows' squares, float32 sums, :func:`channel_square_sums`) and R~ = P_p^T G_p (a float32
    product) are its rounded inputs. So its error is E = sum_p sum_j w_j ((g~ - g)_pj + 2 X_j . (R~ - R)_pj), the
    inputs' rounding alone, which the test computes in float64; |E| <= I = gamma_m sum_j w_j (g_j + 2 |X_j| . |P|^T
    |G_j|) on any machine. What the function adds is float64 (and, for X . (M - I) X, float32) rounding, at most B:
    every value it sums is bounded by A_j = |||G_j| + |P| |X_j|||^2, each float64 sum has fewer than m + n + 2r + 8
    terms (gram over m rows, channels over n), the float32 term is at most gamma_{2r+2} |X_j|^T |M - I| |X_j|, and
    the float64 reference adds as much again (the factor 4 covers both, and A_j bounding each of the three terms)."""
    m, n = grad.shape
    rank = basis.shape[1]
    g64, p64, x64, w64 = grad.double(), basis.double(), x.double(), weights.double()
    error = torch.zeros((), dtype=torch.float64)
    for rows, grad_squares, own_low_rank in parts:
        squares = grad_squares - g64[rows].square().sum(0, keepdim=True)
        own = own_low_rank.double() - p64[rows].t() @ g64[rows]
        error = error + (w64 * (squares + 2 * (x64 * own).sum(0, keepdim=True))).sum()
    inputs = gamma(m, torch.float32) * (w64 * (g64.square().sum(0, keepdim=True)
                                               + 2 * (x64.abs() * (p64.abs().t() @ g64.abs())).sum(0, keepdim=True))).sum()
    sizes = (w64 * (g64.abs() + p64.abs() @ x64.abs()).square().sum(0, keepdim=True)).sum()
    deviation = (p64.t() @ p64 - torch.eye(rank, dtype=torch.float64)).abs()
    small = (w64 * (x64.abs() * (deviation @ x64.abs())).sum(0, keepdim=True)).sum()
    arithmetic = 4 * gamma(m + n + 2 * rank + 8, torch.float64) * sizes + 2 * gamma(2 * rank + 2, torch.float32) * small
    return error, inputs, arithmetic


def test_rows_split_over_two_processes_give_the_whole_weights_total():
    """Output side, rows of G and P split 100 / 156 over two threads whose ``total`` is an all-reduce: each gets the
    whole weight's total (each adds its rows' part of M = P^T P and of R). With the residual at about 1e-4 of G's
    energy, every total differs from the exact one by its float32 inputs' rounding E (:func:`output_side_error_budget`:
    G's squares and R, the only float32 values that cancel) to within the float64 bound B, and so by at most I + B;
    which of the values inside I a machine gets depends on its matrix kernel (AVX2 and AVX-512 differ)."""
    grad, _ = small_residual_gradient(256, 128, 8, 1e-4, seed=1)
    basis = svd_basis(grad, 8, "left")
    low_rank = project(grad, basis, "left")
    weights = channel_norm_ratio(torch.ones_like(low_rank), low_rank, "left").square()
    term = LowRankTerm(-low_rank, basis, "left")
    whole_inputs = [(slice(0, 256), channel_square_sums(grad, True), low_rank)]
    whole = weighted_square_total(whole_inputs[0][1], weights, 1.0, term, low_rank)
    exact = (weights.double() * (grad.double() - basis.double() @ low_rank.double()).square().sum(0)).sum()
    barrier, shared, results, split_inputs = threading.Barrier(2), [None, None], [None, None], [None, None]

    def process(rank: int, rows: slice) -> None:
        def total(value):
            shared[rank] = value
            barrier.wait()
            summed = shared[0] + shared[1]
            barrier.wait()
            return summed

        split_inputs[rank] = (rows, channel_square_sums(grad[rows], True), project(grad[rows], basis[rows], "left"))
        results[rank] = weighted_square_total(split_inputs[rank][1], weights, 1.0,
                                              LowRankTerm(-low_rank, basis[rows], "left"), split_inputs[rank][2], total)

    threads = [threading.Thread(target=process, args=(rank, rows)) for rank, rows in
               enumerate((slice(0, 100), slice(100, 256)))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert float(results[0]) == float(results[1])
    for value, parts in ((whole, whole_inputs), (results[0], split_inputs)):
        error, inputs, arithmetic = output_side_error_budget(grad, basis, -low_rank, weights, parts)
        assert abs(float(value - exact - error)) <= float(arithmetic)
        assert abs(float(value - exact)) <= float(inputs + arithmetic)
    assert float(arithmetic) < 1e-6 * float(exact)          # the bound is tight enough to catch a float32 term


def test_the_residual_norm_keeps_its_precision_when_the_residual_is_small():
    """A gradient with 1e-4 of its energy outside the basis: the stored norm (from square sums, the float32 G's and R's
    of which cancel 4 of float32's 7 digits) is the exact norm of the residual of those float32 inputs but for their
    rounding E (:func:`output_side_error_budget`), to within the float64 bound B and the float32 rounding of the
    stored value; so it is within I + B of it on any machine."""
    rank = 8
    grad, grad64 = small_residual_gradient(256, 128, rank, 1e-4, seed=0)
    basis = svd_basis(grad, rank, "left")
    low_rank = project(grad, basis, "left")
    direction = torch.ones_like(low_rank)
    grad_squares = channel_square_sums(grad, True)
    _, _, stored = fira_update(grad_squares, low_rank, low_rank, direction, basis, "left", 1.0, None, 1.01, 1.0)
    phi = channel_norm_ratio(direction, low_rank, "left")
    exact = (phi.double() * (grad.double() - basis.double() @ low_rank.double())).square().sum()
    assert 0.5e-4 < float((grad.double() - basis.double() @ low_rank.double()).square().sum() / grad64.square().sum())
    error, inputs, arithmetic = output_side_error_budget(grad, basis, -low_rank, phi.square(),
                                                         [(slice(0, 256), grad_squares, low_rank)])
    stored_rounding = 3 * gamma(1, torch.float32) * exact                    # the float32 norm, squared
    assert abs(float(stored.double().square() - exact - error)) <= float(arithmetic + stored_rounding)
    assert abs(float(stored.double().square() - exact)) <= float(inputs + arithmetic + stored_rounding)


def test_scaling_is_per_column_on_the_output_side_and_per_row_on_the_input_side():
    direction = torch.tensor([[3.0, 0.0], [4.0, 1.0]])
    low_rank = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    torch.testing.assert_close(channel_norm_ratio(direction, low_rank, "left"),
                               torch.tensor([[5.0 / (1 + 1e-8), 1.0 / (2 + 1e-8)]]))
    torch.testing.assert_close(channel_norm_ratio(direction, low_rank, "right"),
                               torch.tensor([[3.0 / (math.sqrt(5) + 1e-8)], [math.sqrt(17) / 1e-8]]))


def test_limiter_caps_growth_per_step_and_leaves_shrinking_alone():
    assert float(norm_growth_divisor(torch.tensor(2.0), torch.tensor(1.0), 1.01)) == pytest.approx(2.0 / 1.01)
    assert float(norm_growth_divisor(torch.tensor(2.0), torch.tensor(100.0), 1.01)) == 1.0   # shrinking
    assert float(norm_growth_divisor(torch.tensor(2.0), torch.tensor(math.inf), 1.01)) == 1.0  # no norm yet
    assert norm_growth_divisor(torch.tensor(2.0), None, 1.01) == 1.0
    assert norm_growth_divisor(torch.tensor(2.0), torch.tensor(1.0), None) == 1.0            # limiter off


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
        factor, term, norm = fira_update(channel_square_sums(grad, side == "left"), low_rank, low_rank, direction,
                                         basis, side, 1.0, norm, limit, adam_bias_factor(step, *betas))
        apply_update(weight, lr, 1.0, torch.tensor(True), low_rank=term, gradient=ScaledGradient(grad, factor))
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
