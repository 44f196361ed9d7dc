"""Sparsely coded residuals: the optimizer against an independent dense re-implementation of both modes."""

from __future__ import annotations

import io
import math
import warnings

import pytest
import torch
from hypothesis import given, settings, strategies as st

from galore_plus import GaLorePlusAdamW
from galore_plus.kernels.dispatch import use_kernel
from galore_plus.sparse_residual.index import select_residual_index
from galore_plus.sparse_residual.values import gathered_products

LR, BETAS, EPS, WD, SCALE = 0.01, (0.9, 0.999), 1e-8, 0.1, 0.5


class DenseResidualAdamW:
    """GaLore AdamW with a sparse residual, written with full m x n matrices (the semantics of issue 3)."""

    def __init__(self, weight: torch.Tensor, ratio: float, warmup: int, mode: str):
        self.weight = weight.clone().double()
        self.ratio, self.warmup, self.mode = ratio, warmup, mode
        self.t = 0
        self.c = 0
        self.low_m = self.low_v = None
        self.mask = None
        self.full_m = torch.zeros_like(self.weight)
        self.full_v = torch.zeros_like(self.weight)

    def step(self, grad: torch.Tensor, basis: torch.Tensor, side: str) -> None:
        b1, b2 = BETAS
        self.t += 1
        t = self.t
        g, basis = grad.double(), basis.double()
        left = side == "left"
        low = basis.t() @ g if left else g @ basis.t()
        back = (lambda x, b=basis: b @ x) if left else (lambda x, b=basis: x @ b)
        if self.low_m is None:
            self.low_m, self.low_v = torch.zeros_like(low), torch.zeros_like(low)
        self.low_m = b1 * self.low_m + (1 - b1) * low
        self.low_v = b2 * self.low_v + (1 - b2) * low * low
        direction = (self.low_m / (1 - b1**t)) / ((self.low_v / (1 - b2**t)).sqrt() + EPS)
        update = SCALE * back(direction)
        if self.mask is None and t >= self.warmup:
            count = math.ceil(self.ratio * g.numel())
            top = back(self.low_m).abs().flatten().topk(count).indices
            self.mask = torch.zeros(g.numel(), dtype=torch.bool)
            self.mask[top] = True
            self.mask = self.mask.view_as(g)
        if t > self.warmup:
            self.c += 1
            if self.mode == "exact":
                self.full_m = torch.where(self.mask, b1 * self.full_m + (1 - b1) * g, 0.0)
                self.full_v = torch.where(self.mask, b2 * self.full_v + (1 - b2) * g * g, 0.0)
                exact = SCALE * (self.full_m / (1 - b1**self.c)) / ((self.full_v / (1 - b2**self.c)).sqrt() + EPS)
                update = torch.where(self.mask, exact, update)
            else:
                ghat = back(low)
                dgrad = (g - ghat) * self.mask
                self.full_m = b1 * self.full_m + (1 - b1) * dgrad
                self.full_v = b2 * self.full_v + 2 * (1 - b2) * ghat * dgrad
                vrec = basis.square() @ self.low_v if left else self.low_v @ basis.square()
                second = ((vrec + self.full_v) / (1 - b2**t)).clamp(min=0)
                delta = (self.full_m / (1 - b1**t)) / (second.sqrt() + EPS)
                update = update + SCALE * delta * self.mask
        self.weight = self.weight * (1 - LR * WD) - LR * update


def gradient_sequence(shape: tuple[int, int], steps: int, seed: int) -> list[torch.Tensor]:
    """Gradients with a dominant low-rank part plus noise, independent of the weights."""
    generator = torch.Generator().manual_seed(seed)
    m, n = shape
    base = torch.randn(m, 3, generator=generator) @ torch.randn(3, n, generator=generator)
    return [base + 0.3 * torch.randn(m, n, generator=generator) for _ in range(steps)]


def make_optimizer(weight: torch.nn.Parameter, **group) -> GaLorePlusAdamW:
    options = dict(rank=4, update_proj_gap=3, scale=SCALE, projector="randomized", full_rank_residual=False)
    options.update(group)
    return GaLorePlusAdamW([dict(params=[weight], **options)], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, seed=1)


def residual_bytes(state: dict) -> int:
    return sum(v.numel() * v.element_size() for k, v in state.items() if k.startswith("residual_") and torch.is_tensor(v))


@pytest.mark.parametrize("mode", ["exact", "paper"])
@pytest.mark.parametrize("shape, group, side", [
    ((24, 40), dict(proj_type="left"), "left"),
    ((40, 24), dict(proj_type="std"), "right"),
    ((32, 20), dict(projector="cross_head", num_heads=4), "right"),
])
@pytest.mark.parametrize("warmup", [0, 2])
def test_matches_dense_reference_step_by_step(mode, shape, group, side, warmup):
    weight = torch.nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(3)))
    opt = make_optimizer(weight, residual_ratio=0.05, residual_warmup=warmup, residual_mode=mode, **group)
    reference = DenseResidualAdamW(weight.detach(), 0.05, warmup, mode)
    for step, grad in enumerate(gradient_sequence(shape, 8, seed=4), start=1):
        weight.grad = grad.clone()
        opt.step()
        reference.step(grad, opt.state[weight]["projector"], side)
        torch.testing.assert_close(weight.detach().double(), reference.weight, rtol=1e-5, atol=1e-6,
                                   msg=lambda text: f"step {step}: {text}")
    state = opt.state[weight]
    rows = torch.repeat_interleave(torch.arange(shape[0]), state["residual_row_ptr"].diff().long())
    chosen = torch.zeros(shape, dtype=torch.bool)
    chosen[rows, state["residual_col"].long()] = True
    assert torch.equal(chosen, reference.mask)
    assert state["residual_step"] == 8 - warmup


def test_bfloat16_weight_is_rounded_once_at_index():
    weight = torch.nn.Parameter(torch.randn(24, 40, generator=torch.Generator().manual_seed(5)).bfloat16())
    opt = make_optimizer(weight, residual_ratio=0.1, residual_warmup=1)
    reference = DenseResidualAdamW(weight.detach().float(), 0.1, 1, "exact")
    for grad in gradient_sequence((24, 40), 4, seed=6):
        reference.weight = weight.detach().double()
        weight.grad = grad.bfloat16()
        opt.step()
        reference.step(grad.bfloat16().float(), opt.state[weight]["projector"], "left")
        mask = reference.mask if reference.mask is not None else torch.zeros(24, 40, dtype=torch.bool)
        exact = reference.weight[mask]
        nearest_error = (exact - exact.bfloat16().double()).abs()
        assert ((weight.detach()[mask].double() - exact).abs() <= nearest_error + 1e-6 * exact.abs()).all()


@pytest.mark.parametrize("group", [dict(), dict(residual_ratio=0.0, residual_warmup=0, residual_mode="paper")])
def test_ratio_zero_equals_core_bit_for_bit(group):
    weights = [torch.nn.Parameter(torch.randn(20, 30, generator=torch.Generator().manual_seed(7))) for _ in range(2)]
    plain, with_zero = make_optimizer(weights[0]), make_optimizer(weights[1], **group)
    for grad in gradient_sequence((20, 30), 5, seed=8):
        weights[0].grad, weights[1].grad = grad.clone(), grad.clone()
        plain.step()
        with_zero.step()
    assert torch.equal(weights[0], weights[1])
    assert plain.state[weights[0]].keys() == with_zero.state[weights[1]].keys()


@pytest.mark.parametrize("mode", ["exact", "paper"])
def test_resume_with_residual_equals_never_stopping(mode):
    grads = gradient_sequence((24, 40), 8, seed=9)
    start = torch.randn(24, 40, generator=torch.Generator().manual_seed(10))
    straight = torch.nn.Parameter(start.clone())
    opt = make_optimizer(straight, residual_ratio=0.05, residual_warmup=2, residual_mode=mode)
    for grad in grads:
        straight.grad = grad.clone()
        opt.step()

    first = torch.nn.Parameter(start.clone())
    opt = make_optimizer(first, residual_ratio=0.05, residual_warmup=2, residual_mode=mode)
    for grad in grads[:4]:
        first.grad = grad.clone()
        opt.step()
    buffer = io.BytesIO()
    torch.save({"weight": first.detach(), "optimizer": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = torch.nn.Parameter(saved["weight"].clone())
    opt = make_optimizer(resumed, residual_ratio=0.05, residual_warmup=2, residual_mode=mode)
    opt.load_state_dict(saved["optimizer"])
    assert opt.state[resumed]["residual_col"].dtype == torch.int16
    for grad in grads[4:]:
        resumed.grad = grad.clone()
        opt.step()
    assert (resumed.detach() - saved["weight"]).abs().mean() > LR / 10  # a no-op optimizer would keep the saved weight
    saved_residual = saved["optimizer"]["state"][0]["residual_exp_avg"]
    assert not torch.equal(opt.state[resumed]["residual_exp_avg"], saved_residual)  # the residual stepped after resuming
    assert torch.equal(straight, resumed)


@pytest.mark.parametrize("ratio", [0.001, 0.01, 0.05])
def test_residual_memory_is_proportional_to_index_count(ratio):
    m, n = 64, 96
    weight = torch.nn.Parameter(torch.zeros(m, n))
    opt = make_optimizer(weight, residual_ratio=ratio, residual_warmup=1)
    for grad in gradient_sequence((m, n), 2, seed=11):
        weight.grad = grad
        opt.step()
    state = opt.state[weight]
    count = math.ceil(ratio * m * n)
    assert state["residual_col"].numel() == count
    assert residual_bytes(state) == count * (4 + 4 + 2) + (m + 1) * 4
    assert all(v.numel() < m * n for v in state.values() if torch.is_tensor(v))


@settings(max_examples=15, deadline=None, derandomize=True)
@given(m=st.integers(1, 40), n=st.integers(1, 50), rank=st.integers(1, 4), fraction=st.floats(0.001, 0.99),
       left=st.booleans(), chunk=st.integers(1, 200), seed=st.integers(0, 2**16))
def test_chunked_selection_equals_dense_topk(m, n, rank, fraction, left, chunk, seed):
    generator = torch.Generator().manual_seed(seed)
    basis = torch.randn(m, rank, generator=generator) if left else torch.randn(rank, n, generator=generator)
    moment = torch.randn(rank, n, generator=generator) if left else torch.randn(m, rank, generator=generator)
    count = math.ceil(fraction * m * n)
    row_ptr, col = select_residual_index(basis, moment, "left" if left else "right", (m, n), count, chunk)
    dense = (basis @ moment) if left else (moment @ basis)
    expected = dense.abs().flatten().topk(count).indices.sort().values
    rows = torch.repeat_interleave(torch.arange(m), row_ptr.diff().long())
    assert torch.equal(rows * n + col.long(), expected)
    assert row_ptr.dtype == torch.int32 and col.dtype == torch.int16


def test_wide_weight_uses_int32_columns():
    basis, moment = torch.randn(3, 1), torch.randn(1, 40000)
    _, col = select_residual_index(basis, moment, "left", (3, 40000), 10)
    assert col.dtype == torch.int32


@pytest.mark.parametrize("side", ["left", "right"])
def test_chunked_gathered_products_equal_dense_products(side):
    generator = torch.Generator().manual_seed(12)
    m, n, r = 13, 17, 5
    basis = torch.randn(m, r, generator=generator) if side == "left" else torch.randn(r, n, generator=generator)
    others = tuple(torch.randn((r, n) if side == "left" else (m, r), generator=generator) for _ in range(3))
    rows, cols = torch.randint(0, m, (50,), generator=generator), torch.randint(0, n, (50,), generator=generator)
    outputs = gathered_products(basis, others, 1, rows * n + cols, n, side, chunk_elements=3 * r)
    for position, (other, output) in enumerate(zip(others, outputs)):
        weight = basis.square() if position == 1 else basis
        dense = weight @ other if side == "left" else other @ weight
        torch.testing.assert_close(output, dense[rows, cols])


@pytest.mark.parametrize("mode", ["exact", "paper"])
def test_nan_gradient_skips_residual_and_leaves_moments_finite(mode):
    weight = torch.nn.Parameter(torch.randn(24, 40, generator=torch.Generator().manual_seed(13)))
    opt = make_optimizer(weight, residual_ratio=0.05, residual_warmup=1, residual_mode=mode)
    grads = gradient_sequence((24, 40), 5, seed=14)
    for grad in grads[:3]:
        weight.grad = grad.clone()
        opt.step()
    state = opt.state[weight]
    before = {k: v.clone() for k, v in state.items() if torch.is_tensor(v)}
    row = int(torch.repeat_interleave(torch.arange(24), state["residual_row_ptr"].diff().long())[0])
    bad = grads[3].clone()
    bad[row, int(state["residual_col"][0])] = float("nan")
    weight.grad = bad
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
    assert any("non-finite gradient" in str(w.message) for w in caught)
    assert all(torch.equal(before[k], state[k]) for k in before)
    weight.grad = grads[4].clone()
    opt.step()
    assert torch.isfinite(state["residual_exp_avg"]).all() and torch.isfinite(state["residual_exp_avg_sq"]).all()
    assert torch.isfinite(weight).all()


@pytest.mark.parametrize("group, key, error", [
    (dict(rank=2, residual_ratio=-0.1), "residual_ratio", ValueError),
    (dict(rank=2, residual_ratio=1.0), "residual_ratio", ValueError),
    (dict(rank=2, residual_ratio=float("nan")), "residual_ratio", ValueError),
    (dict(rank=2, residual_ratio="1%"), "residual_ratio", TypeError),
    (dict(rank=2, residual_warmup=-1), "residual_warmup", ValueError),
    (dict(rank=2, residual_warmup=2.0), "residual_warmup", TypeError),
    (dict(rank=2, residual_mode="dense"), "residual_mode", ValueError),
    (dict(residual_ratio=0.01), "residual_ratio", ValueError),
    (dict(residual_mode="exact"), "residual_mode", ValueError),
])
def test_bad_residual_options_name_the_group_and_key(group, key, error):
    weight = torch.nn.Parameter(torch.zeros(8, 8))
    with pytest.raises(error, match=rf"param group 0 \('attn'\), key '{key}'"):
        GaLorePlusAdamW([dict(params=[weight], name="attn", **group)])


def test_cpu_tensors_use_the_torch_reference():
    assert not use_kernel(torch.zeros(2))


def test_missing_triton_is_detected(monkeypatch):
    import sys

    from galore_plus.kernels.dispatch import triton_available

    monkeypatch.setitem(sys.modules, "triton", None)
    assert triton_available.__wrapped__() is False


@pytest.mark.parametrize("mode", ["exact", "paper"])
def test_non_contiguous_weight_equals_contiguous_weight(mode):
    start = torch.randn(40, 24, generator=torch.Generator().manual_seed(15))
    weights = [torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.t().contiguous().t())]
    assert not weights[1].is_contiguous()
    opts = [make_optimizer(w, residual_ratio=0.05, residual_warmup=1, residual_mode=mode) for w in weights]
    for grad in gradient_sequence((40, 24), 4, seed=16):
        for weight, opt in zip(weights, opts):
            weight.grad = grad.clone()
            opt.step()
    torch.testing.assert_close(weights[1].detach(), weights[0].detach(), rtol=1e-6, atol=1e-6)


def test_selection_reconstructs_one_block_of_rows_at_a_time_and_steps_never_do(monkeypatch):
    import galore_plus.sparse_residual.index as residual

    blocks = []
    original = residual.reconstructed_rows

    def recording(basis, low_rank, side, start, stop):
        block = original(basis, low_rank, side, start, stop)
        blocks.append(block.numel())
        return block

    monkeypatch.setattr(residual, "reconstructed_rows", recording)
    monkeypatch.setattr(residual.select_residual_index, "__defaults__", (256,))
    weight = torch.nn.Parameter(torch.zeros(64, 32))
    opt = make_optimizer(weight, residual_ratio=0.05, residual_warmup=2, residual_mode="paper")
    for grad in gradient_sequence((64, 32), 6, seed=17):
        weight.grad = grad
        opt.step()
    assert blocks == [256] * 8


@settings(max_examples=8, deadline=None, derandomize=True)
@given(m=st.integers(4, 30), n=st.integers(4, 30), rank=st.integers(1, 4), ratio=st.floats(0.001, 0.6),
       warmup=st.integers(0, 3), proj_type=st.sampled_from(["left", "right"]), seed=st.integers(0, 2**16))
def test_random_shapes_match_dense_reference_exact_mode(m, n, rank, ratio, warmup, proj_type, seed):
    """Exact mode only: "paper" divides by sqrt(max(Vrec + dV, 0)) + eps, which on random inputs can
    cancel to about 0, where float32 and float64 legitimately differ by orders of magnitude; the
    parametrised test above covers "paper" on fixed inputs."""
    mode = "exact"
    weight = torch.nn.Parameter(torch.randn(m, n, generator=torch.Generator().manual_seed(seed)))
    opt = make_optimizer(weight, rank=rank, residual_ratio=ratio, residual_warmup=warmup, residual_mode=mode,
                         proj_type=proj_type, projector="svd")
    reference = DenseResidualAdamW(weight.detach(), ratio, warmup, mode)
    reference_side = "left" if proj_type == "left" else "right"
    for grad in gradient_sequence((m, n), 5, seed=seed + 1):
        weight.grad = grad.clone()
        opt.step()
        reference.step(grad, opt.state[weight]["projector"], reference_side)
        torch.testing.assert_close(weight.detach().double(), reference.weight, rtol=1e-4, atol=1e-5)
