"""APOLLO's update rule against apollo_torch.APOLLOAdamW on the same gradients and the same basis."""

import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from galore_plus import APOLLO, APOLLO_MINI, GaLorePlusAdamW
from galore_plus.rules.apollo import apollo_direction, apollo_factor, apollo_step_size, gradient_scaling
from galore_plus.rules.adam import update_moments
from galore_plus.step.projection import project
from galore_plus.step.apply import ScaledGradient, apply_update

BETAS = (0.9, 0.999)
EPS = 1e-6


def growing_gradients(shape: tuple[int, int], steps: int, seed: int) -> list[torch.Tensor]:
    """Gradients whose norm grows 1.5x per step from step 4 on, so the norm-growth limiter acts."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) * 1e-2 * 1.5 ** max(0, t - 3) for t in range(steps)]


def run_apollo_torch(weight, grads, rank, scale_type, scale, gap, lr, weight_decay=0.0):
    """apollo_torch's weights after each step and the basis it used at each step."""
    apollo_torch = pytest.importorskip("apollo_torch")
    param = torch.nn.Parameter(weight.clone())
    group = {"params": [param], "rank": rank, "proj": "random", "scale_type": scale_type, "scale": scale,
             "update_proj_gap": gap, "proj_type": "std"}
    optimizer = apollo_torch.APOLLOAdamW([group], lr=lr, betas=BETAS, eps=EPS, weight_decay=weight_decay)
    weights, bases = [], []
    for grad in grads:
        param.grad = grad.clone()
        optimizer.step()
        weights.append(param.detach().clone())
        bases.append(optimizer.state[param]["projector"].ortho_matrix.clone())
    return weights, bases


def run_ours(weight, grads, bases, scale_type, scale, lr, weight_decay=0.0):
    """Our pure functions on the same gradients and bases: weights after each step, and whether the limiter acted."""
    side = "right" if weight.shape[0] >= weight.shape[1] else "left"
    weight = weight.clone()
    exp_avg = exp_avg_sq = previous_norm = None
    weights, limited = [], []
    for step, (grad, basis) in enumerate(zip(grads, bases), start=1):
        low_rank = project(grad, basis, side)
        if exp_avg is None:
            exp_avg, exp_avg_sq = torch.zeros_like(low_rank), torch.zeros_like(low_rank)
        update_moments(low_rank, exp_avg, exp_avg_sq, *BETAS)
        direction = apollo_direction(exp_avg, exp_avg_sq, EPS)
        unlimited = float((grad * gradient_scaling(direction, low_rank, side, scale_type)).norm())
        factor, previous_norm = apollo_factor(grad, low_rank, direction, side, scale_type, scale, previous_norm)
        limited.append(float(previous_norm) < unlimited * (1 - 1e-4))
        apply_update(weight, apollo_step_size(lr, step, *BETAS), 1 - lr * weight_decay, torch.tensor(True),
                     gradient=ScaledGradient(grad, factor))
        weights.append(weight.clone())
    return weights, limited


@settings(max_examples=12, deadline=None, derandomize=True)
@given(m=st.integers(2, 40), n=st.integers(2, 40), rank_fraction=st.floats(0.0, 1.0),
       scale_type=st.sampled_from(["channel", "tensor"]), scale=st.sampled_from([1.0, 128.0]),
       seed=st.integers(0, 2**16))
def test_equals_apollo_torch_on_the_same_basis(m, n, rank_fraction, scale_type, scale, seed):
    rank = max(1, round(rank_fraction * min(m, n)))
    weight = torch.randn(m, n, generator=torch.Generator().manual_seed(seed + 1))
    grads = growing_gradients((m, n), 8, seed)
    theirs, bases = run_apollo_torch(weight, grads, rank, scale_type, scale, gap=3, lr=1e-2)
    ours, limited = run_ours(weight, grads, bases, scale_type, scale, lr=1e-2)
    assert not torch.equal(bases[0], bases[3])  # the basis was refreshed at step 4
    assert any(limited)
    for step, (mine, reference) in enumerate(zip(ours, theirs), start=1):
        moved = float((reference - weight).abs().max())
        assert moved > 1e-3, f"step {step}: the weights did not move"
        assert torch.allclose(mine, reference, rtol=0, atol=2e-5 * moved), f"step {step}"


def test_apollo_mini_rank_one_tensor_scaling_equals_apollo_torch():
    weight = torch.randn(64, 48, generator=torch.Generator().manual_seed(3))
    grads = growing_gradients((64, 48), 10, 4)
    theirs, bases = run_apollo_torch(weight, grads, 1, "tensor", 128.0, gap=200, lr=1e-2)
    ours, _ = run_ours(weight, grads, bases, "tensor", 128.0, lr=1e-2)
    moved = float((theirs[-1] - weight).abs().max())
    assert moved > 1e-2
    assert torch.allclose(ours[-1], theirs[-1], rtol=0, atol=2e-5 * moved)


def test_weight_decay_is_applied_to_the_old_weight_where_apollo_torch_decays_the_updated_one():
    """One step: ours = w (1 - lr wd) - a U and theirs = (w - a U)(1 - lr wd), so ours = theirs / (1 - lr wd) - lr wd w."""
    lr, weight_decay = 1e-2, 0.5
    weight = torch.randn(20, 12, generator=torch.Generator().manual_seed(5))
    grads = growing_gradients((20, 12), 1, 6)
    theirs, bases = run_apollo_torch(weight, grads, 4, "channel", 1.0, gap=200, lr=lr, weight_decay=weight_decay)
    ours, _ = run_ours(weight, grads, bases, "channel", 1.0, lr=lr, weight_decay=weight_decay)
    decay = lr * weight_decay
    expected = theirs[0] / (1 - decay) - decay * weight
    assert float((ours[0] - theirs[0]).abs().max()) > 1e-4  # the orders differ measurably
    assert torch.allclose(ours[0], expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("side, factor_shape", [("right", (30, 1)), ("left", (1, 20))])
def test_channel_scaling_is_one_factor_per_unprojected_channel_in_float64(side, factor_shape):
    """Dense float64 check: factor j is ||N_j|| / (||R_j|| + 1e-8) over the channel's low-rank entries."""
    generator = torch.Generator().manual_seed(0)
    low_rank = torch.randn((30, 4) if side == "right" else (4, 20), generator=generator, dtype=torch.float64)
    direction = torch.randn(low_rank.shape, generator=generator, dtype=torch.float64)
    factor = gradient_scaling(direction, low_rank, side, "channel")
    assert factor.shape == factor_shape
    rows = low_rank if side == "right" else low_rank.t()
    directions = direction if side == "right" else direction.t()
    expected = [math.sqrt(float((d * d).sum())) / (math.sqrt(float((r * r).sum())) + 1e-8) for r, d in zip(rows, directions)]
    assert torch.allclose(factor.flatten(), torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0)


@pytest.mark.parametrize("scale_type, side", [("channel", "right"), ("channel", "left"), ("tensor", "right")])
def test_the_norm_from_channel_norms_equals_the_norm_of_the_formed_update(scale_type, side):
    generator = torch.Generator().manual_seed(0)
    grad = torch.randn(12, 9, generator=generator, dtype=torch.float64)
    low_rank = torch.randn((12, 3) if side == "right" else (3, 9), generator=generator, dtype=torch.float64)
    direction = torch.randn(low_rank.shape, generator=generator, dtype=torch.float64)
    factor, norm = apollo_factor(grad, low_rank, direction, side, scale_type, 4.0, torch.tensor(0.1, dtype=torch.float64))
    formed = grad * gradient_scaling(direction, low_rank, side, scale_type)
    divisor = float(formed.norm()) / (0.1 + 1e-8) / 1.01
    assert math.isclose(float(norm), float(formed.norm()) / divisor, rel_tol=1e-12)
    assert torch.allclose(grad * factor, 2.0 * formed / divisor, rtol=1e-12, atol=0)


# ---------------------------------------------------------------- the rule inside GaLorePlusAdamW


def injected_projector(monkeypatch, bases):
    """Register a projector that returns apollo_torch's basis of each step, in order."""
    from galore_plus.projectors import PROJECTORS
    from galore_plus.projectors.base import Projector

    remaining = list(bases)
    monkeypatch.setitem(PROJECTORS, "injected", Projector(lambda *args: remaining.pop(0), stores_basis=False))


@pytest.mark.parametrize("shape, scale_type, rank, scale", [((24, 16), "channel", 4, 1.0), ((12, 30), "tensor", 1, 128.0)])
def test_optimizer_equals_apollo_torch_given_its_basis(monkeypatch, shape, scale_type, rank, scale):
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    grads = growing_gradients(shape, 8, 3)
    theirs, bases = run_apollo_torch(weight, grads, rank, scale_type, scale, gap=3, lr=1e-2)
    injected_projector(monkeypatch, bases)
    param = torch.nn.Parameter(weight.clone())
    group = {"params": [param], "rank": rank, "projector": "injected", "update_rule": "apollo",
             "scale_type": scale_type, "scale": scale}
    opt = GaLorePlusAdamW([group], lr=1e-2, betas=BETAS, eps=EPS, weight_decay=0.0)
    for step, (grad, reference) in enumerate(zip(grads, theirs), start=1):
        param.grad = grad.clone()
        opt.step()
        moved = float((reference - weight).abs().max())
        assert moved > 1e-3
        assert torch.allclose(param.detach(), reference, rtol=0, atol=2e-5 * moved), f"step {step}"
    assert set(opt.state[param]) == {"step", "exp_avg", "exp_avg_sq", "apollo_norm"}


def apollo_model(dtype=torch.float32, optim_bits=32, preset=APOLLO, seed=0):
    torch.manual_seed(seed)
    weights = [torch.nn.Parameter(torch.randn(24, 16, dtype=dtype)), torch.nn.Parameter(torch.randn(12, 20, dtype=dtype))]
    bias = torch.nn.Parameter(torch.randn(24, dtype=dtype))
    groups = [{"params": weights, "rank": 4, **preset, "update_proj_gap": 3}, {"params": [bias]}]
    return [*weights, bias], GaLorePlusAdamW(groups, lr=1e-2, seed=11, optim_bits=optim_bits)


def gradient_stream(params, steps):
    generator = torch.Generator().manual_seed(4)
    return [[torch.randn(p.shape, generator=generator).to(p.dtype) for p in params] for _ in range(steps)]


def run(opt, params, stream):
    for grads in stream:
        for param, grad in zip(params, grads):
            param.grad = grad
        opt.step()


@pytest.mark.parametrize("preset", ["APOLLO", "APOLLO_MINI"])
@pytest.mark.parametrize("optim_bits", [32, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_load_weights_only_and_continue_equals_never_stopping(dtype, optim_bits, preset):
    if optim_bits == 8:
        pytest.importorskip("bitsandbytes")
    preset = {"APOLLO": APOLLO, "APOLLO_MINI": APOLLO_MINI}[preset]
    params, opt = apollo_model(dtype, optim_bits, preset)
    start = [p.detach().clone() for p in params]
    stream = gradient_stream(params, 8)
    run(opt, params, stream)
    resumed_params, resumed_opt = apollo_model(dtype, optim_bits, preset)
    run(resumed_opt, resumed_params, stream[:4])
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in resumed_params], "optimizer": resumed_opt.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    params_b, opt_b = apollo_model(dtype, optim_bits, preset, seed=99)
    with torch.no_grad():
        for param, saved in zip(params_b, checkpoint["params"]):
            param.copy_(saved)
    opt_b.load_state_dict(checkpoint["optimizer"])
    run(opt_b, params_b, stream[4:])
    for before, never_stopped, resumed in zip(start, params, params_b):
        assert float((never_stopped.detach().float() - before.float()).abs().max()) > 1e-2  # every weight moved
        assert torch.equal(never_stopped, resumed)


def test_per_layer_steps_equal_normal_steps():
    from galore_plus.per_layer import enable_per_layer_steps

    params, opt = apollo_model()
    layered_params, layered_opt = apollo_model()
    enable_per_layer_steps(layered_opt)
    inputs = torch.randn(5, 24, generator=torch.Generator().manual_seed(0))
    for model_params, optimizer in ((params, opt), (layered_params, layered_opt)):
        for _ in range(4):
            optimizer.zero_grad()
            first, second, bias = model_params
            hidden = inputs @ first
            (hidden.square().sum() + (hidden[:, :12] @ second).square().sum() + bias.sum()).backward()
            optimizer.step()
    assert not torch.equal(params[0], apollo_model()[0][0])
    for normal, layered in zip(params, layered_params):
        assert torch.equal(normal, layered)


def test_a_step_marked_not_finite_leaves_the_weight_and_the_limiter_norm_unchanged():
    from galore_plus.rules.apollo import apollo_rule
    from galore_plus.rules.base import UpdateInputs

    weight = torch.randn(10, 6)
    grad, low_rank = torch.randn(10, 6), torch.randn(10, 2)
    group = {"betas": BETAS, "eps": EPS, "scale_type": "channel", "scale": 1.0, "lr": 0.1, "weight_decay": 0.1}
    for previous in (None, torch.tensor(0.5)):
        state = {"exp_avg": 0.1 * low_rank, "exp_avg_sq": 0.001 * low_rank.square()}
        if previous is not None:
            state["apollo_norm"] = previous
        before = weight.clone()
        for finite in (False, True):
            apollo_rule(UpdateInputs(weight, (10, 6), grad, low_rank, torch.zeros_like(low_rank), torch.zeros(2, 6),
                                     "right", 1, torch.tensor(finite)), state, group)
            if not finite:
                assert torch.equal(weight, before)
                assert float(state["apollo_norm"]) == (math.inf if previous is None else 0.5)
        assert not torch.equal(weight, before) and math.isfinite(float(state["apollo_norm"]))


@pytest.mark.parametrize("keys, key, message", [
    ({"scale_type": "row"}, "scale_type", "must be one of"),
    ({"residual_ratio": 0.01}, "residual_ratio", "update rule 'apollo' do not read it.*read by update rule 'galore'"),
    ({"scale": -1.0}, "scale", "sqrt"),
    ({"scale": "auto"}, "scale", "needs a number"),
    ({"full_rank_residual": True}, "full_rank_residual", "update rule 'apollo' do not read it"),
    ({"update_rule": "apolo"}, "update_rule", "must be one of"),
])
def test_bad_apollo_keys_name_the_group_and_key(keys, key, message):
    weight = torch.nn.Parameter(torch.randn(8, 8))
    with pytest.raises(ValueError, match=rf"param group 0 \('attn'\), key '{key}': .*{message}"):
        GaLorePlusAdamW([{"params": [weight], "name": "attn", "rank": 2, **APOLLO, **keys}])
