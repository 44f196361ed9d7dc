"""The levers inside GaLorePlusAdamW: group-key validation, each lever against a reference, composition, resume."""

import pytest
import torch

from galore_plus import GaLorePlusAdamW
from galore_plus.full_rank_residual import adam_bias_factor, norm_scaled_update
from galore_plus.moment_transfer import transfer_moments


def param(*shape):
    return torch.nn.Parameter(torch.zeros(*shape))


@pytest.mark.parametrize(
    "group, error, words",
    [
        ({"moment_transfer": 1}, TypeError, "'moment_transfer': must be a bool"),
        ({"full_rank_residual": "yes"}, TypeError, "'full_rank_residual': must be a bool"),
        ({"adaptive_gap": None}, TypeError, "'adaptive_gap': must be a bool"),
        ({"norm_growth_limit": 0.99}, ValueError, "'norm_growth_limit': must be >= 1"),
        ({"norm_growth_limit": "1.01"}, TypeError, "'norm_growth_limit': must be a finite number"),
        ({"max_update_proj_gap": 5, "update_proj_gap": 10}, ValueError, "'max_update_proj_gap': must be >= 10"),
        ({"max_update_proj_gap": 20.0}, TypeError, "'max_update_proj_gap': must be an int"),
        ({"gap_overlap_threshold": 0.0}, ValueError, "'gap_overlap_threshold': must be in (0, 1]"),
        ({"gap_overlap_threshold": 1.5}, ValueError, "'gap_overlap_threshold': must be in (0, 1]"),
        ({"gap_patience": 0}, ValueError, "'gap_patience': must be >= 1"),
        ({"scale": "automatic"}, TypeError, "'scale': must be a finite number or 'auto'"),
        ({"cross_head_heads": 2.0}, TypeError, "'cross_head_heads': must be an int"),
        ({"projector": "cross_head", "num_heads": 4, "cross_head_heads": 0}, ValueError, "'cross_head_heads': must be >= 1"),
        ({"projector": "cross_head", "num_heads": 4, "cross_head_heads": 5}, ValueError, "'cross_head_heads': 5 heads"),
        ({"rank": 4, "projector": "cross_head", "num_heads": 4, "cross_head_heads": 1}, ValueError,
         "needs between rank = 4"),
    ],
)
def test_bad_lever_keys_raise_naming_the_group_and_key(group, error, words):
    with pytest.raises(error) as info:
        GaLorePlusAdamW([{"params": [param(3)]}, {"params": [param(8, 8)], "name": "attn", "rank": 2, **group}])
    assert "param group 1 ('attn')" in str(info.value)
    assert words in str(info.value)


def test_lever_keys_in_a_plain_group_are_refused():
    with pytest.raises(ValueError, match="param group 0, key 'moment_transfer': is only meaningful in a projected group"):
        GaLorePlusAdamW([{"params": [param(4, 4)], "moment_transfer": True}])


# ---------------------------------------------------------------- helpers

def gradient_stream(shape, steps, seed=0, drift=1.0):
    """Gradients of one (m, n) weight: a fixed low-rank part plus a changing part of size ``drift``."""
    generator = torch.Generator().manual_seed(seed)
    m, n = shape
    base = torch.randn(m, 3, generator=generator) @ torch.randn(3, n, generator=generator)
    return [base + drift * torch.randn(m, n, generator=generator) for _ in range(steps)]


def run(optimizer, weight, grads):
    for grad in grads:
        weight.grad = grad.clone()
        optimizer.step()


def optimizer_for(weight, lr=0.01, weight_decay=0.0, eps=1e-8, optim_bits=32, **group):
    group = {"rank": 3, "update_proj_gap": 2, "projector": "svd", **group}
    return GaLorePlusAdamW([{"params": [weight], **group}], lr=lr, weight_decay=weight_decay, eps=eps,
                           optim_bits=optim_bits)


def start_weight(shape, seed=5):
    return torch.nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(seed)))


# ---------------------------------------------------------------- moment transfer

@pytest.mark.parametrize("shape", [(12, 8), (8, 12)])
def test_moment_transfer_moves_the_moments_into_the_new_basis_at_a_refresh(shape):
    """State after a refresh step == float64 reference: transfer the saved moments, then one Adam moment update."""
    grads = gradient_stream(shape, 3, seed=1)
    weight = start_weight(shape)
    optimizer = optimizer_for(weight, moment_transfer=True)
    run(optimizer, weight, grads[:2])
    state = optimizer.state[weight]
    old = state["projector"].double()
    exp_avg, exp_avg_sq = state["exp_avg"].double(), state["exp_avg_sq"].double()
    run(optimizer, weight, grads[2:])
    new = state["projector"].double()
    side = "left" if shape[0] < shape[1] else "right"
    low_rank = (new.t() @ grads[2].double()) if side == "left" else (grads[2].double() @ new.t())
    moved_avg, moved_avg_sq = transfer_moments(exp_avg, exp_avg_sq, old, new, side)
    torch.testing.assert_close(state["exp_avg"].double(), 0.9 * moved_avg + 0.1 * low_rank, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state["exp_avg_sq"].double(), 0.999 * moved_avg_sq + 0.001 * low_rank**2,
                               rtol=1e-5, atol=1e-7)
    assert state["step"] == 3
    kept = optimizer_for(start_weight(shape))                                 # without the lever: moments as they were
    run(kept, kept.param_groups[0]["params"][0], grads)
    assert not torch.allclose(kept.state[kept.param_groups[0]["params"][0]]["exp_avg"], state["exp_avg"], atol=1e-3)


def test_moment_transfer_with_8bit_moments_stays_within_quantisation_error_of_32bit():
    """The 8-bit run differs from the 32-bit one by much less than the transfer changes the result."""
    pytest.importorskip("bitsandbytes")
    shape = (64, 80)
    grads = gradient_stream(shape, 6, seed=2)
    weights = {}
    for bits, transfer in ((32, True), (8, True), (32, False)):
        weight = start_weight(shape)
        run(optimizer_for(weight, lr=0.1, rank=8, optim_bits=bits, moment_transfer=transfer), weight, grads)
        weights[bits, transfer] = weight.detach()
    effect = (weights[32, True] - weights[32, False]).abs().max()
    assert float(effect) > 0.01
    assert float((weights[32, True] - weights[8, True]).abs().max()) < 0.2 * float(effect)


# ---------------------------------------------------------------- full-rank residual

@pytest.mark.parametrize("shape", [(20, 12), (12, 20)])
def test_full_rank_residual_equals_fira_adamw(shape):
    """Same gradients, svd bases, 10 steps over 4 refreshes, limiter acting: scale = alpha = 1, eps = 0, no decay."""
    fira = pytest.importorskip("fira")
    grads = [size * grad for size, grad in zip([1, 1.5, 0.7, 3, 1, 4, 0.5, 2, 6, 1], gradient_stream(shape, 10, seed=3))]
    theirs = start_weight(shape)
    reference = fira.FiraAdamW([{"params": [theirs], "rank": 4, "update_proj_gap": 3, "alpha": 1.0, "proj_type": "std"}],
                               lr=0.01, eps=0.0, weight_decay=0.0, no_deprecation_warning=True)
    run(reference, theirs, grads)
    ours = start_weight(shape)
    run(optimizer_for(ours, eps=0.0, rank=4, update_proj_gap=3, scale=1.0, full_rank_residual=True), ours, grads)
    torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-5, atol=1e-6)
    moved = (theirs - start_weight(shape)).detach().abs().max()
    galore_only = start_weight(shape)
    run(optimizer_for(galore_only, eps=0.0, rank=4, update_proj_gap=3, scale=1.0), galore_only, grads)
    assert float(moved) > 0.05
    assert float((galore_only - theirs).detach().abs().max()) > 0.01           # the residual term is a visible part of it


def test_full_rank_residual_with_weight_decay_follows_the_documented_update():
    """p <- p (1 - lr wd) - lr scale (P N + S), S and the limiter from the pure functions, in float64."""
    shape = (10, 14)
    grads = gradient_stream(shape, 4, seed=4)
    weight = start_weight(shape)
    optimizer = optimizer_for(weight, lr=0.05, weight_decay=0.1, rank=3, update_proj_gap=10, scale=0.5,
                              full_rank_residual=True)
    expected = weight.detach().double()
    exp_avg = exp_avg_sq = norm = None
    for step, grad in enumerate(grads, start=1):
        run(optimizer, weight, [grad])
        basis = optimizer.state[weight]["projector"].double()
        low_rank = basis.t() @ grad.double()
        if exp_avg is None:
            exp_avg, exp_avg_sq = torch.zeros_like(low_rank), torch.zeros_like(low_rank)
        exp_avg = 0.9 * exp_avg + 0.1 * low_rank
        exp_avg_sq = 0.999 * exp_avg_sq + 0.001 * low_rank**2
        direction = (exp_avg / (1 - 0.9**step)) / ((exp_avg_sq / (1 - 0.999**step)).sqrt() + 1e-8)
        update, norm = norm_scaled_update(grad.double(), low_rank, direction, basis, "left", norm, 1.01,
                                          adam_bias_factor(step, 0.9, 0.999))
        expected = expected * (1 - 0.05 * 0.1) - 0.05 * 0.5 * update
        torch.testing.assert_close(weight.detach().double(), expected, rtol=0, atol=1e-5)
    assert float((weight.detach().double() - start_weight(shape).detach().double()).abs().max()) > 0.05
    assert optimizer.state[weight]["residual_norm"].dtype == torch.float32


def test_full_and_sparse_residual_compose_sparse_entries_win_at_the_index_set():
    """With both: at I the weight equals the sparse-only run, elsewhere the full-rank-only run."""
    shape = (16, 12)
    grads = gradient_stream(shape, 6, seed=5)
    common = dict(rank=3, update_proj_gap=3, residual_warmup=0)
    runs = {}
    for name, keys in {"both": dict(full_rank_residual=True, residual_ratio=0.1),
                       "full": dict(full_rank_residual=True), "sparse": dict(residual_ratio=0.1)}.items():
        weight = start_weight(shape)
        optimizer = optimizer_for(weight, **common, **keys)
        run(optimizer, weight, grads)
        runs[name] = (weight.detach(), optimizer.state[weight])
    state = runs["both"][1]
    at_index = torch.zeros(shape, dtype=torch.bool)
    rows = torch.repeat_interleave(torch.arange(shape[0]), state["residual_row_ptr"].diff().long())
    at_index[rows, state["residual_col"].long()] = True
    assert 0 < int(at_index.sum()) < at_index.numel()
    assert torch.equal(runs["both"][0][at_index], runs["sparse"][0][at_index])
    assert torch.equal(runs["both"][0][~at_index], runs["full"][0][~at_index])
    assert float((runs["full"][0] - runs["sparse"][0])[at_index].abs().max()) > 1e-3
