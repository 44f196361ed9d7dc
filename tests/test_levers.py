"""The levers inside GaLorePlusAdamW: group-key validation, each lever against a reference, composition, resume."""

import io
import warnings

import pytest
import torch

from galore_plus import GaLorePlusAdamW
from galore_plus.step.moment_transfer import transfer_moments
from support import HostReads


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
        ({"projector": "cross_head", "num_heads": 4, "cross_head_heads": 2.0}, TypeError, "'cross_head_heads': must be an int"),
        ({"projector": "cross_head", "num_heads": 4, "cross_head_heads": 0}, ValueError, "'cross_head_heads': must be >= 1"),
        ({"rank": 4, "projector": "cross_head", "num_heads": 4, "cross_head_heads": 1}, ValueError,
         "'cross_head_heads': 1 heads of 2 rows of parameter 0 of shape (8, 8) give fewer rows than rank = 4"),
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

@pytest.mark.parametrize("alpha", [1.0, 0.25])
@pytest.mark.parametrize("shape", [(20, 12), (12, 20)])
def test_full_rank_residual_equals_fira_adamw(shape, alpha):
    """Same gradients, svd bases, 10 steps over 4 refreshes, limiter acting: scale = alpha, eps = 0, no decay."""
    fira = pytest.importorskip("fira")
    grads = [size * grad for size, grad in zip([1, 1.5, 0.7, 3, 1, 4, 0.5, 2, 6, 1], gradient_stream(shape, 10, seed=3))]
    theirs = start_weight(shape)
    reference = fira.FiraAdamW([{"params": [theirs], "rank": 4, "update_proj_gap": 3, "alpha": alpha, "proj_type": "std"}],
                               lr=0.01, eps=0.0, weight_decay=0.0, no_deprecation_warning=True)
    run(reference, theirs, grads)
    ours = start_weight(shape)
    run(optimizer_for(ours, eps=0.0, rank=4, update_proj_gap=3, scale=alpha, full_rank_residual=True), ours, grads)
    torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-5, atol=1e-6)
    moved = (theirs - start_weight(shape)).detach().abs().max()
    galore_only = start_weight(shape)
    run(optimizer_for(galore_only, eps=0.0, rank=4, update_proj_gap=3, scale=alpha), galore_only, grads)
    assert float(moved) > 0.05
    assert float((galore_only - theirs).detach().abs().max()) > 0.01           # the residual term is a visible part of it


def test_full_rank_residual_with_weight_decay_follows_the_documented_update():
    """p <- p (1 - lr wd) - lr (scale P N + S), S = phi (G - scale P R) and the limiter written out in float64."""
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
        phi = direction.norm(dim=0, keepdim=True) / (low_rank.norm(dim=0, keepdim=True) + 1e-8)
        residual = phi * (grad.double() - 0.5 * basis @ low_rank)
        measured = residual.norm() * (1 - 0.9**step) / (1 - 0.999**step) ** 0.5   # without the bias correction
        divisor = 1.0 if norm is None else max(float(measured / (norm + 1e-8)), 1.01) / 1.01
        norm = measured / divisor
        expected = expected * (1 - 0.05 * 0.1) - 0.05 * (0.5 * basis @ direction + residual / divisor)
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


# ---------------------------------------------------------------- adaptive refresh gap

def test_adaptive_gap_doubles_on_a_stable_subspace_and_counts_refreshes():
    """A gradient with a fixed dominant subspace: gap 2 -> 4 -> 8 (the maximum), 5 refreshes in 24 steps against 12."""
    shape = (12, 8)
    grads = gradient_stream(shape, 24, seed=6, drift=0.01)
    weight = start_weight(shape)
    optimizer = optimizer_for(weight, rank=3, update_proj_gap=2, adaptive_gap=True, gap_patience=1,
                              gap_overlap_threshold=0.9, max_update_proj_gap=8)
    refresh_steps = []
    for step, grad in enumerate(grads, start=1):
        before = optimizer.refresh_counts()[0]
        run(optimizer, weight, [grad])
        if optimizer.refresh_counts()[0] > before:
            refresh_steps.append(step)
    assert refresh_steps == [1, 3, 7, 15, 23]
    state = optimizer.state[weight]
    assert (state["refresh_gap"], state["next_refresh_step"], state["refresh_count"]) == (8, 31, 5)
    fixed = optimizer_for(start_weight(shape), rank=3, update_proj_gap=2)
    run(fixed, fixed.param_groups[0]["params"][0], grads)
    assert fixed.refresh_counts() == {0: 12}


def test_adaptive_gap_keeps_the_fixed_schedule_when_the_subspace_keeps_changing():
    """Pure noise gradients: overlaps near r / d, below the threshold, so the steps and bases equal the fixed gap's."""
    shape = (12, 8)
    grads = gradient_stream(shape, 12, seed=7, drift=10.0)
    weights = []
    for adaptive in (True, False):
        weight = start_weight(shape)
        optimizer = optimizer_for(weight, rank=2, update_proj_gap=3, adaptive_gap=adaptive, gap_overlap_threshold=0.9)
        run(optimizer, weight, grads)
        weights.append(weight.detach())
        assert optimizer.refresh_counts() == {0: 4}
    assert torch.equal(weights[0], weights[1])


def test_a_non_finite_step_at_a_refresh_keeps_the_weight_and_moments_in_the_new_basis():
    """Sync-free skip: the refresh (from finite rows) and the moment transfer happen, the Adam update does not."""
    shape = (12, 8)
    grads = gradient_stream(shape, 3, seed=8)
    weight = start_weight(shape)
    optimizer = optimizer_for(weight, update_proj_gap=2, adaptive_gap=True, moment_transfer=True, full_rank_residual=True,
                              projector="cross_head", num_heads=3)
    run(optimizer, weight, grads[:2])
    state = optimizer.state[weight]
    old_basis, old_avg, old_avg_sq = state["projector"].clone(), state["exp_avg"].clone(), state["exp_avg_sq"].clone()
    old_norm, old_weight = state["residual_norm"].clone(), weight.detach().clone()
    bad = grads[2].clone()
    bad[0, 1] = float("nan")                 # row 0 (head 0) makes R non-finite; the refresh reads another head
    run(optimizer, weight, [bad])
    assert torch.equal(weight.detach(), old_weight)
    assert torch.equal(state["residual_norm"], old_norm)
    assert not torch.equal(state["projector"], old_basis)
    moved_avg, moved_avg_sq = transfer_moments(old_avg, old_avg_sq, old_basis, state["projector"], "right")
    torch.testing.assert_close(state["exp_avg"], moved_avg, rtol=0, atol=1e-6)
    torch.testing.assert_close(state["exp_avg_sq"], moved_avg_sq, rtol=0, atol=1e-6)
    assert state["step"] == 3 and state["refresh_count"] == 2
    run(optimizer, weight, [grads[2]])
    assert not torch.equal(weight.detach(), old_weight)


# ---------------------------------------------------------------- scale="auto"

@pytest.mark.parametrize("shape, projected", [((12, 20), 12), ((20, 12), 12), ((30, 10), 10)])
def test_auto_scale_without_residual_is_sqrt_of_projected_dimension_over_rank(shape, projected):
    grads = gradient_stream(shape, 4, seed=9)
    weights = []
    for scale in ("auto", (projected / 3) ** 0.5):
        weight = start_weight(shape)
        run(optimizer_for(weight, rank=3, scale=scale), weight, grads)
        weights.append(weight.detach())
    torch.testing.assert_close(weights[0], weights[1], rtol=0, atol=1e-6)


def test_auto_scale_with_full_rank_residual_gives_the_whole_update_the_direction_rms():
    shape = (16, 24)
    grads = gradient_stream(shape, 3, seed=10)
    weight = start_weight(shape)
    optimizer = optimizer_for(weight, lr=1.0, rank=4, update_proj_gap=5, scale="auto", full_rank_residual=True)
    run(optimizer, weight, grads[:2])
    before = weight.detach().clone()
    run(optimizer, weight, grads[2:])
    state = optimizer.state[weight]
    step, basis = 3, state["projector"]
    direction = (state["exp_avg"] / (1 - 0.9**step)) / ((state["exp_avg_sq"] / (1 - 0.999**step)).sqrt() + 1e-8)
    update = before - weight.detach()                        # lr = 1, no decay
    torch.testing.assert_close(update.square().mean().sqrt(), direction.square().mean().sqrt(), rtol=1e-5, atol=0)
    assert basis.shape == (16, 4)


def test_auto_scale_uses_scale_one_for_the_sparse_residual_entries():
    shape = (16, 12)
    grads = gradient_stream(shape, 4, seed=11)
    weights = []
    for scale in ("auto", 1.0):
        weight = start_weight(shape)
        optimizer = optimizer_for(weight, rank=3, scale=scale, residual_ratio=0.1, residual_warmup=0)
        run(optimizer, weight, grads)
        weights.append(weight.detach())
    state = optimizer.state[weight]
    rows = torch.repeat_interleave(torch.arange(shape[0]), state["residual_row_ptr"].diff().long())
    cols = state["residual_col"].long()
    assert torch.equal(weights[0][rows, cols], weights[1][rows, cols])
    assert not torch.allclose(weights[0], weights[1])


# ---------------------------------------------------------------- cross-head head count

@pytest.mark.parametrize("heads, rows", [(None, 4), (2, 8), (4, 16), (9, 24)])
def test_cross_head_basis_reads_the_chosen_number_of_heads_at_most_all(heads, rows, monkeypatch):
    from galore_plus.projectors import cross_head

    read_rows = []
    original = cross_head.shared_head_basis
    monkeypatch.setattr(cross_head, "shared_head_basis", lambda rows, *args: read_rows.append(rows.shape[0]) or original(rows, *args))
    weight = start_weight((24, 16))
    run(optimizer_for(weight, rank=3, projector="cross_head", num_heads=6, cross_head_heads=heads),
        weight, gradient_stream((24, 16), 1))
    assert read_rows == [rows]


# ---------------------------------------------------------------- every lever on: resume, per-layer

ALL_LEVERS = dict(moment_transfer=True, full_rank_residual=True, adaptive_gap=True, gap_patience=1,
                  gap_overlap_threshold=0.3, scale="auto", residual_ratio=0.05, residual_warmup=1)


def lever_model(dtype):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 24), torch.nn.Tanh(), torch.nn.Linear(24, 10)).to(dtype)
    return model


def lever_optimizer(model, optim_bits=32):
    groups = [{"params": [model[0].weight], "rank": 4, "update_proj_gap": 2, "projector": "cross_head",
               "num_heads": 3, "cross_head_heads": 2, **ALL_LEVERS},
              {"params": [model[2].weight], "rank": 3, "update_proj_gap": 2, "projector": "randomized", **ALL_LEVERS},
              {"params": [model[0].bias, model[2].bias]}]
    return GaLorePlusAdamW(groups, lr=1e-2, seed=1, optim_bits=optim_bits)


def train(model, optimizer, batches):
    for x, y in batches:
        torch.nn.functional.mse_loss(model(x.to(model[0].weight.dtype)).float(), y).backward()
        optimizer.step()
        optimizer.zero_grad()


def lever_batches(count):
    generator = torch.Generator().manual_seed(2)
    return [(torch.randn(16, 12, generator=generator), torch.randn(16, 10, generator=generator)) for _ in range(count)]


@pytest.mark.parametrize("dtype, bits", [(torch.float32, 32), (torch.bfloat16, 32), (torch.float32, 8)])
def test_resume_with_every_lever_on_is_bit_exact(dtype, bits):
    if bits == 8:
        pytest.importorskip("bitsandbytes")
    batches = lever_batches(12)
    model = lever_model(dtype)
    start = [p.detach().clone() for p in model.parameters()]
    optimizer = lever_optimizer(model, bits)
    train(model, optimizer, batches)
    assert all(float((p.detach().float() - s.float()).abs().max()) > 1e-3 for p, s in zip(model.parameters(), start))
    assert optimizer.state[model[0].weight]["refresh_gap"] > 2                 # the adaptive gap grew in this run

    first = lever_model(dtype)
    first_optimizer = lever_optimizer(first, bits)
    train(first, first_optimizer, batches[:5])
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": first_optimizer.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    resumed = lever_model(dtype)
    resumed.load_state_dict(checkpoint["model"])
    resumed_optimizer = lever_optimizer(resumed, bits)
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    train(resumed, resumed_optimizer, batches[5:])
    for never_stopped, continued in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(never_stopped, continued)


def test_per_layer_steps_with_every_lever_on_equal_normal_steps():
    from galore_plus.per_layer import enable_per_layer_steps

    batches = lever_batches(6)
    normal = lever_model(torch.float32)
    train(normal, lever_optimizer(normal), batches)
    per_layer = lever_model(torch.float32)
    optimizer = lever_optimizer(per_layer)
    enable_per_layer_steps(optimizer)
    train(per_layer, optimizer, batches)
    for a, b in zip(normal.parameters(), per_layer.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bits", [32, 8])
def test_steps_without_a_refresh_read_nothing_on_the_host_with_every_lever_on(bits):
    """The levers keep the step sync-free: host reads (the adaptive gap's overlap) happen at refreshes only."""
    if bits == 8:
        pytest.importorskip("bitsandbytes")
    tall = torch.nn.Parameter(torch.randn(16, 12))
    wide = torch.nn.Parameter(torch.randn(12, 16, dtype=torch.bfloat16))
    group = {"params": [tall, wide], "rank": 4, "update_proj_gap": 3, "projector": "svd", **ALL_LEVERS}
    optimizer = GaLorePlusAdamW([group], lr=1e-2, weight_decay=0.1, optim_bits=bits)
    reads, refreshed = {}, set()
    for t in range(1, 9):
        tall.grad, wide.grad = torch.randn(16, 12), torch.randn(12, 16, dtype=torch.bfloat16)
        if t == 5:
            tall.grad[2, 3] = float("nan")
        before, counts = tall.detach().clone(), optimizer.refresh_counts()
        with warnings.catch_warnings(), HostReads() as recorder:
            warnings.simplefilter("ignore")
            optimizer.step()
        reads[t] = recorder.calls
        if optimizer.refresh_counts() != counts:
            refreshed.add(t)
        assert torch.equal(tall, before) == (t == 5)
    assert refreshed and len(refreshed) < 8
    assert {t: calls for t, calls in reads.items() if t not in refreshed} == {t: [] for t in range(1, 9) if t not in refreshed}
