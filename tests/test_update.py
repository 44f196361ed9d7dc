"""Applying an update in row blocks: p <- p d - step (f G + P X | f G + X Q), against a float64 reference."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from galore_plus.step.apply import apply_update
from support import terms_of

TRUE, FALSE = torch.tensor(True), torch.tensor(False)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(m=st.integers(1, 40), n=st.integers(1, 30), rank=st.integers(1, 6), side=st.sampled_from(["left", "right"]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       grad_dtype=st.sampled_from([torch.float32, torch.bfloat16]), terms=st.sampled_from(["low_rank", "grad", "both"]),
       factor_kind=st.sampled_from(["tensor", "row", "column"]), block_values=st.sampled_from([None, 1, 50, 300]),
       decay=st.sampled_from([1.0, 0.9]), seed=st.integers(0, 2**16))
def test_update_in_row_blocks_matches_the_float64_update(m, n, rank, side, dtype, grad_dtype, terms, factor_kind,
                                                         block_values, decay, seed):
    """Weights of every dtype, updated a few rows at a time (in place for float32, through a float32 buffer for the
    others), are within one rounding of the float64 update; a step of 0.5 makes the decay (10 %) and the terms
    (about half a weight entry) far larger than the tolerance."""
    generator = torch.Generator().manual_seed(seed)
    term, gradient, back, scaled = terms_of(m, n, rank, side, factor_kind, grad_dtype, generator)
    param = torch.randn(m, n, generator=generator).to(dtype)
    start = param.clone()
    used = {"low_rank": (term, None), "grad": (None, gradient), "both": (term, gradient)}[terms]
    apply_update(param, 0.5, decay, TRUE, *used, block_values=block_values)
    update = (back if used[0] else 0.0) + (scaled if used[1] else 0.0)
    exact = start.double() * decay - 0.5 * update
    sizes = start.double().abs() + 0.5 * ((back.abs() if used[0] else 0.0) + (scaled.abs() if used[1] else 0.0))
    assert param.dtype == dtype and not torch.equal(param, start)
    # one rounding to the weight's dtype (two for float32, whose two terms are added in place one after the other)
    # plus float32 arithmetic on terms of this size
    assert ((param.double() - exact).abs() <= 2 * torch.finfo(dtype).eps * exact.abs() + 1e-6 * sizes).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("side", ["left", "right"])
def test_a_step_that_is_not_finite_leaves_the_weight_unchanged(side, dtype):
    """``finite`` False comes with NaN/Inf in G and X: neither the decay nor either term may change p, bit for bit."""
    generator = torch.Generator().manual_seed(1)
    term, gradient, _, _ = terms_of(23, 9, 3, side, "row", dtype, generator)
    term.low_rank[0, 0] = float("nan")
    gradient.grad[1, 2], gradient.grad[3, 4] = float("inf"), float("nan")
    param = torch.randn(23, 9, generator=generator).to(dtype)
    start = param.clone()
    apply_update(param, 0.5, 0.9, FALSE, term, gradient, block_values=2 * 9)
    assert torch.equal(param, start)
    clean, clean_gradient, _, _ = terms_of(23, 9, 3, side, "row", dtype, generator)
    apply_update(param, 0.5, 0.9, TRUE, clean, clean_gradient, block_values=2 * 9)
    assert not torch.equal(param, start) and bool(param.isfinite().all())


def test_a_transposed_bfloat16_weight_is_updated_through_its_view():
    """``transposed`` groups step ``param.t()``, a non-contiguous view: every row block is written back into it."""
    generator = torch.Generator().manual_seed(2)
    stored = torch.randn(16, 40, generator=generator).bfloat16()  # the parameter; its transpose (40, 16) is stepped
    term, gradient, back, scaled = terms_of(40, 16, 4, "right", "row", torch.bfloat16, generator)
    start = stored.t().clone()
    apply_update(stored.t(), 0.5, 0.9, TRUE, term, gradient, block_values=3 * 16)
    exact = start.double() * 0.9 - 0.5 * (back + scaled)
    sizes = start.double().abs() + 0.5 * (back.abs() + scaled.abs())
    assert not torch.equal(stored.t(), start)
    assert ((stored.t().double() - exact).abs() <= torch.finfo(torch.bfloat16).eps * exact.abs() + 1e-6 * sizes).all()
