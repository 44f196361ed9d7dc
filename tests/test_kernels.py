"""Triton kernels against their float32 torch references, run on the CPU with TRITON_INTERPRET=1."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

pytest.importorskip("triton", reason="triton is not installed; the torch references are used everywhere")


from galore_plus.step.rounding import spacing, update_magnitude  # noqa: E402
import galore_plus.kernels.lowrank_adam as lowrank_adam_kernel  # noqa: E402  (TRITON_INTERPRET=1 from conftest.py)
import galore_plus.kernels.residual_step as residual_kernel  # noqa: E402
import galore_plus.kernels.weight_update as weight_update_kernel  # noqa: E402

from galore_plus.rules.adam import lowrank_adam_direction  # noqa: E402
from galore_plus.sparse_residual.index import flat_index, select_residual_index  # noqa: E402
from galore_plus.step.apply import LowRankTerm, ScaledGradient, apply_update  # noqa: E402
from support import terms_of  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@settings(max_examples=10, deadline=None, derandomize=True)
@given(rows=st.integers(1, 40), cols=st.integers(1, 70), step=st.integers(1, 50),
       beta1=st.sampled_from([0.0, 0.9]), grad_dtype=st.sampled_from(["float32", "bfloat16"]), seed=st.integers(0, 2**16))
def test_lowrank_adam_kernel_equals_reference(rows, cols, step, beta1, grad_dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    grad = torch.randn(rows, cols, generator=generator).to(DTYPES[grad_dtype])
    exp_avg = torch.randn(rows, cols, generator=generator)
    exp_avg_sq = torch.rand(rows, cols, generator=generator)
    ref_avg, ref_avg_sq = exp_avg.clone(), exp_avg_sq.clone()
    expected = lowrank_adam_direction(grad.float(), ref_avg, ref_avg_sq, step, beta1, 0.999, 1e-8)
    direction = lowrank_adam_kernel.lowrank_adam_direction_triton(grad, exp_avg, exp_avg_sq, step, beta1, 0.999, 1e-8)
    torch.testing.assert_close(exp_avg, ref_avg, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(exp_avg_sq, ref_avg_sq, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(direction, expected, rtol=1e-5, atol=1e-6)


@settings(max_examples=12, deadline=None, derandomize=True)
@given(m=st.integers(2, 40), n=st.integers(2, 50), rank=st.integers(1, 40), ratio=st.floats(0.01, 0.5),
       left=st.booleans(), mode=st.sampled_from(["exact", "paper"]),
       param_dtype=st.sampled_from(list(DTYPES)), step=st.integers(1, 30), seed=st.integers(0, 2**16))
def test_residual_kernel_equals_reference(m, n, rank, ratio, left, mode, param_dtype, step, seed):
    from galore_plus.sparse_residual.values import residual_values

    rank = min(rank, m, n)
    side = "left" if left else "right"
    generator = torch.Generator().manual_seed(seed)
    param = torch.randn(m, n, generator=generator).to(DTYPES[param_dtype])
    grad = torch.randn(m, n, generator=generator)
    basis = torch.randn(m, rank, generator=generator) if left else torch.randn(rank, n, generator=generator)
    low_shape = (rank, n) if left else (m, rank)
    low_rank, low_avg, direction = (torch.randn(low_shape, generator=generator) for _ in range(3))
    low_avg_sq = torch.rand(low_shape, generator=generator)
    count = max(1, int(ratio * m * n))
    index = flat_index(*select_residual_index(basis, low_avg, side, (m, n), count), n)
    moments = torch.randn(count, generator=generator), torch.rand(count, generator=generator)
    reference_moments = tuple(x.clone() for x in moments)
    scalars = dict(mode=mode, step=step, residual_step=max(1, step - 3), beta1=0.9, beta2=0.999, eps=1e-8,
                   lr=0.01, weight_decay=0.1, scale=0.25)
    expected = residual_values(param, grad, index, *reference_moments, basis, side, low_rank, low_avg_sq,
                               direction, **scalars)
    values = residual_kernel.residual_values_triton(param, grad, index, *moments, basis, side, low_rank,
                                                    low_avg_sq, direction, **scalars)
    torch.testing.assert_close(moments[0], reference_moments[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(moments[1], reference_moments[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(values, expected, rtol=1e-5, atol=1e-5)


def test_residual_kernel_handles_strided_weight_and_gradient():
    from galore_plus.sparse_residual.values import residual_values

    generator = torch.Generator().manual_seed(0)
    param, grad = torch.randn(30, 20, generator=generator).t(), torch.randn(30, 20, generator=generator).t()
    basis = torch.randn(3, 30, generator=generator)
    low = [torch.randn(20, 3, generator=generator) for _ in range(4)]
    index = flat_index(*select_residual_index(basis, low[1], "right", (20, 30), 40), 30)
    args = (basis, "right", low[0], low[2].abs(), low[3], "paper", 5, 2, 0.9, 0.999, 1e-8, 0.01, 0.1, 0.25)
    moments, reference_moments = (torch.zeros(40), torch.zeros(40)), (torch.zeros(40), torch.zeros(40))
    expected = residual_values(param, grad, index, *reference_moments, *args)
    values = residual_kernel.residual_values_triton(param, grad, index, *moments, *args)
    torch.testing.assert_close(values, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["exact", "paper"])
@pytest.mark.parametrize("proj_type", ["left", "right"])
def test_optimizer_through_the_kernels_equals_the_reference_path(monkeypatch, mode, proj_type):
    import galore_plus.kernels.dispatch
    from galore_plus import GaLorePlusAdamW

    start = torch.randn(24, 36, generator=torch.Generator().manual_seed(1))
    grads = [torch.randn(24, 36, generator=torch.Generator().manual_seed(2 + i)) for i in range(4)]
    results = []
    for kernels in (False, True):
        monkeypatch.setattr(galore_plus.kernels.dispatch, "use_kernel", lambda tensor, kernels=kernels: kernels)
        weight = torch.nn.Parameter(start.clone())
        opt = GaLorePlusAdamW([dict(params=[weight], rank=3, proj_type=proj_type, residual_ratio=0.05,
                                    residual_warmup=1, residual_mode=mode)], lr=0.01)
        for grad in grads:
            weight.grad = grad.clone()
            opt.step()
        results.append((weight.detach().clone(), opt.state[weight]["residual_exp_avg_sq"].clone()))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-5, atol=1e-8)


def one_ulp(values: torch.Tensor) -> torch.Tensor:
    """One unit in the last place of ``values``' own dtype at each value."""
    return spacing(values, values.dtype)


def update_inputs(m: int, n: int, rank: int, side: str, terms: str, factor_kind: str, seed: int):
    """(LowRankTerm or None, ScaledGradient or None) of :func:`support.terms_of`, G in bfloat16."""
    term, gradient, _, _ = terms_of(m, n, rank, side, factor_kind, torch.bfloat16, torch.Generator().manual_seed(seed))
    return (term if terms in ("low_rank", "both") else None), (gradient if terms in ("gradient", "both") else None)


@settings(max_examples=20, deadline=None, derandomize=True)
@given(m=st.integers(1, 70), n=st.integers(1, 70), rank=st.integers(1, 40), side=st.sampled_from(["left", "right"]),
       terms=st.sampled_from(["low_rank", "gradient", "both"]), factor_kind=st.sampled_from(["tensor", "row", "column"]),
       weight_dtype=st.sampled_from(list(DTYPES)), transposed=st.booleans(), seed=st.integers(0, 2**16))
def test_weight_update_kernel_equals_reference(m, n, rank, side, terms, factor_kind, weight_dtype, transposed, seed):
    """p d - s (f G + P X | f G + X Q) in one kernel against the row-block reference, on a weight of any dtype
    and strides: within one unit in the last place of the weight's dtype plus float32's rounding of the terms
    (the two sum the same float32 terms in a different order; where they cancel, float32's part dominates)."""
    low_rank, gradient = update_inputs(m, n, rank, side, terms, factor_kind, seed)
    dtype = DTYPES[weight_dtype]
    start = torch.randn((n, m) if transposed else (m, n), generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    expected, actual = start.clone(), start.clone()
    view = (lambda weight: weight.t()) if transposed else (lambda weight: weight)
    apply_update(view(expected), 0.05, 0.9, torch.tensor(True), low_rank, gradient)
    weight_update_kernel.apply_update_triton(view(actual), 0.05, 0.9, torch.tensor(True), low_rank, gradient)
    assert (expected != start).float().mean() > 0.5
    bound = one_ulp(view(expected)) + 2**-20 * update_magnitude(view(start), 0.9, 0.05, low_rank, gradient)
    assert bool(((view(actual).float() - view(expected).float()).abs() <= bound).all())


def test_weight_update_kernel_leaves_the_weight_unchanged_when_not_finite():
    low_rank, gradient = update_inputs(40, 30, 5, "right", "both", "row", seed=3)
    gradient.grad[2, 3] = float("nan")
    low_rank.low_rank[0, 0] = float("inf")
    for dtype in (torch.float32, torch.bfloat16):
        start = torch.randn(40, 30).to(dtype)
        weight = start.clone()
        weight_update_kernel.apply_update_triton(weight, 0.05, 0.9, torch.tensor(False), low_rank, gradient)
        assert torch.equal(weight, start)


@pytest.mark.parametrize("options", [dict(), dict(update_rule="apollo", scale_type="channel"),
                                     dict(full_rank_residual=False, proj_type="left")])
def test_optimizer_weight_updates_through_the_kernel_equal_the_reference_path(monkeypatch, options):
    """GaLore+ with its defaults (Fira's residual), APOLLO and plain GaLore on a bfloat16 weight: the same weights
    after 4 steps (one refresh) with the dispatch forced onto the kernels as with the torch references, up to
    one bfloat16 rounding per step (the moments do not depend on the weight, so the differences do not grow)."""
    import galore_plus.kernels.dispatch
    from galore_plus import GaLorePlusAdamW

    start = (0.05 * torch.randn(48, 40, generator=torch.Generator().manual_seed(1))).bfloat16()
    grads = [torch.randn(48, 40, generator=torch.Generator().manual_seed(2 + i)).bfloat16() for i in range(4)]
    results, calls = [], []
    kernel = weight_update_kernel.apply_update_triton
    monkeypatch.setattr(weight_update_kernel, "apply_update_triton", lambda *args, **kwargs: calls.append(1) or kernel(
        *args, **kwargs))
    for kernels in (False, True):
        monkeypatch.setattr(galore_plus.kernels.dispatch, "use_kernel", lambda tensor, kernels=kernels: kernels)
        weight = torch.nn.Parameter(start.clone())
        opt = GaLorePlusAdamW([dict(params=[weight], rank=4, **options)], lr=0.01, weight_decay=0.1)
        for grad in grads:
            weight.grad = grad.clone()
            opt.step()
        results.append(weight.detach().clone())
    assert len(calls) == len(grads) and (results[0] != start).float().mean() > 0.5
    assert bool(((results[1].float() - results[0].float()).abs() <= 4 * one_ulp(results[0]) + 1e-6).all())


def test_a_float64_weight_keeps_the_torch_update_when_kernels_are_on(monkeypatch):
    """The kernel computes in float32, so dispatch sends a float64 weight to the row-block path, kernels or not."""
    import galore_plus.kernels.dispatch

    monkeypatch.setattr(galore_plus.kernels.dispatch, "use_kernel", lambda tensor: True)
    monkeypatch.setattr(weight_update_kernel, "apply_update_triton", lambda *args, **kwargs: pytest.fail("kernel"))
    low_rank, gradient = update_inputs(12, 9, 3, "right", "both", "row", seed=4)
    low_rank = LowRankTerm(low_rank.low_rank.double(), low_rank.basis.double(), low_rank.side)
    gradient = ScaledGradient(gradient.grad.double(), gradient.factor.double())
    start = torch.randn(12, 9, dtype=torch.float64)
    expected, actual = start.clone(), start.clone()
    apply_update(expected, 0.05, 0.9, torch.tensor(True), low_rank, gradient)
    galore_plus.kernels.dispatch.apply_update(actual, 0.05, 0.9, torch.tensor(True), low_rank, gradient)
    assert not torch.equal(expected, start) and torch.equal(actual, expected)
