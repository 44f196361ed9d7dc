"""Per-layer accumulation (enable_per_layer_steps(opt, accumulation_steps=k)) against ordinary accumulation.

Ordinary accumulation (k backward passes into .grad, then optimizer.step()) is the reference: with
``projector="svd"`` and no levers the two are equal to float32 rounding between refreshes. A
refresh computes the basis from the first micro-batch's gradient, so the exactness tests share
the refresh: either a first update taken by both with ordinary steps, or micro-batches that
repeat one batch (their sum is k times the first micro-batch's gradient, whose singular vectors
are those of the first: scaling by a power of 2 is exact).
"""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from galore_plus import GaLorePlusAdamW
from galore_plus.per_layer import enable_per_layer_steps
from support import TinyNet

K = 2
LR = 1e-2
SCALE = 0.25
EPS32 = torch.finfo(torch.float32).eps


def make(bits: int = 32, **keys) -> tuple[TinyNet, GaLorePlusAdamW]:
    torch.manual_seed(0)
    model = TinyNet()
    projected = [model.up.weight, model.down.weight]
    plain = [p for p in model.parameters() if all(p is not q for q in projected)]
    group = {"params": projected, "rank": 8, "projector": "svd", "update_proj_gap": 100, "scale": SCALE, **keys}
    opt = GaLorePlusAdamW([{"params": plain}, group], lr=LR, weight_decay=0.1, optim_bits=bits)
    return model, opt


def micro_batches(updates: int, repeat: bool = False, rows: int = 8) -> list[list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(updates):
        first = torch.randn(rows, 24, generator=generator)
        batches.append([first if repeat or i == 0 else torch.randn(rows, 24, generator=generator) for i in range(K)])
    return batches


def loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).square().mean() / K


def update(model, opt, batch, clip: float | None = None, handle=None) -> None:
    for x in batch:
        loss(model, x).backward()
    if clip is not None:
        if handle is None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        else:
            handle.clip_grad_norm_(clip)
    opt.step()
    opt.zero_grad()


def train(per_layer: bool, batches, bits: int = 32, shared_first: bool = True, clip: float | None = None, **keys):
    """Train on ``batches``; with ``shared_first`` the first update is ordinary in both runs (it refreshes)."""
    model, opt = make(bits, **keys)
    handle = None
    if shared_first:
        update(model, opt, batches[0], clip)
        after_first = [p.detach().clone() for p in model.parameters()]
    if per_layer:
        handle = enable_per_layer_steps(opt, accumulation_steps=K)
    for batch in batches[1:] if shared_first else batches:
        update(model, opt, batch, clip, handle)
    return model, opt, (after_first if shared_first else None)


def step_tolerance(steps: int) -> float:
    """Rounding of `steps` updates lr * scale * N: |N| <= 1 / sqrt(1 - b2) / ... is at most about 3.2 for Adam's
    normalised direction early on (b1 = 0.9, b2 = 0.999); the summed R and the summed full gradient round
    differently by a few ulps, which N passes on relative to its size; 64 ulps per step covers it."""
    return steps * LR * SCALE * 3.2 * 64 * EPS32


@pytest.mark.parametrize("bits", [32, 8])
def test_equals_ordinary_accumulation_between_refreshes(bits):
    if bits == 8:
        pytest.importorskip("bitsandbytes")
    batches = micro_batches(5)
    ordinary, ordinary_opt, start = train(False, batches, bits)
    layered, layered_opt, _ = train(True, batches, bits)
    for (name, a), b, before in zip(ordinary.named_parameters(), layered.parameters(), start):
        assert (a.detach() - before).abs().mean() > LR * SCALE / 50, name  # the 4 compared updates moved it
        torch.testing.assert_close(b, a, rtol=0, atol=step_tolerance(4))
    for param in ordinary_opt.state:
        other = layered_opt.state[dict(zip(ordinary.parameters(), layered.parameters()))[param]]
        assert ordinary_opt.state[param].keys() == other.keys()


def test_refresh_basis_is_the_first_micro_batchs():
    batches = micro_batches(1)
    model, opt = make()
    enable_per_layer_steps(opt, accumulation_steps=K)
    reference, _ = make()
    loss(reference, batches[0][0]).backward()
    update(model, opt, batches[0])
    up_vh = torch.linalg.svd(reference.up.weight.grad, full_matrices=False)[2]
    down_u = torch.linalg.svd(reference.down.weight.grad, full_matrices=False)[0]
    assert torch.equal(opt.state[model.up.weight]["projector"], up_vh[:8])  # (48, 24): right side
    assert torch.equal(opt.state[model.down.weight]["projector"], down_u[:, :8])  # (24, 48): left side


@pytest.mark.parametrize("keys", [
    dict(update_proj_gap=2),
    dict(update_proj_gap=2, moment_transfer=True, adaptive_gap=True, gap_patience=1, gap_overlap_threshold=0.2),
    dict(update_proj_gap=2, projector="randomized", full_rank_residual=False, warm_start=False, basis_bits=4),
    dict(residual_ratio=0.05, residual_warmup=1),
    dict(residual_ratio=0.05, residual_warmup=2, residual_mode="paper"),
])
def test_refresh_levers_and_the_sparse_residual_equal_ordinary_accumulation(keys):
    """Repeated micro-batches share the refresh's basis, so every refresh (its moment transfer and adaptive
    gap included) and the sparse residual (stepped from the summed gradient at I) are exact too."""
    if keys.get("basis_bits") == 4:
        pytest.importorskip("bitsandbytes")
    batches = micro_batches(5, repeat=True)
    ordinary, _, _ = train(False, batches, shared_first=False, **keys)
    layered, layered_opt, _ = train(True, batches, shared_first=False, **keys)
    initial, _ = make()
    for (name, a), b, before in zip(ordinary.named_parameters(), layered.parameters(), initial.parameters()):
        assert (a - before).abs().mean() > LR * SCALE / 50, name
        torch.testing.assert_close(b, a, rtol=0, atol=step_tolerance(5))
    if "residual_ratio" in keys:
        assert layered_opt.state[layered.up.weight]["residual_step"] == 5 - keys["residual_warmup"]


def test_full_rank_residual_differs_from_exact_accumulation_by_less_than_half_its_own_effect():
    """Fira's term scaled by the previous boundary's factor and added per micro-batch (galore_plus.step.accumulate;
    none in the first per-layer update, which has no factor yet): after 7 per-layer updates its distance from
    exact accumulation is below half of what the lever itself changes, and the lever still acts."""
    batches = micro_batches(8)
    exact, _, _ = train(False, batches, full_rank_residual=True)
    layered, _, _ = train(True, batches, full_rank_residual=True)
    without, _, _ = train(False, batches, full_rank_residual=False)
    for (name, a), b, c in zip(exact.named_parameters(), layered.parameters(), without.parameters()):
        effect = (a - c).norm()
        assert effect > LR * SCALE / 50, name
        assert (b - a).norm() <= effect / 2, name
        assert (b - c).norm() >= effect / 2, name


def micro_batch_gradients(batch) -> list[dict[str, torch.Tensor]]:
    """Each micro-batch's gradients, taken at the same weights (those of a fresh model)."""
    grads = []
    for x in batch:
        model, _ = make()
        loss(model, x).backward()
        grads.append({name: p.grad.double() for name, p in model.named_parameters()})
    return grads


def test_clipping_norm_is_exact_up_to_the_cross_terms_outside_the_subspace():
    batch = micro_batches(1, rows=32)[0]  # 32 rows: a micro-batch's gradient has rank 24 > 8, so parts lie outside
    model, opt = make()
    handle = enable_per_layer_steps(opt, accumulation_steps=K)
    for x in batch:
        loss(model, x).backward()
    norm = handle.clip_grad_norm_(math.inf)
    grads = micro_batch_gradients(batch)
    exact_square, cross = 0.0, 0.0
    for name, param in model.named_parameters():
        parts = [grad[name] for grad in grads]
        exact_square += sum(parts).square().sum()
        if any(param is weight for weight in (model.up.weight, model.down.weight)):
            basis = opt.state[param]["projector"].double()
            outside = [g - g @ basis.t() @ basis if basis.shape[0] == 8 else g - basis @ basis.t() @ g for g in parts]
            cross += sum(2 * (outside[i] * outside[j]).sum() for i in range(K) for j in range(i + 1, K))
    assert abs(cross) > 1e-3 * exact_square  # the cross terms are there to be left out
    torch.testing.assert_close(norm.double().square(), exact_square - cross, rtol=1e-5, atol=0)
    summed = [sum(g[name] for g in grads).float() for name, _ in model.named_parameters()]
    assert abs(norm - torch.nn.utils.get_total_norm(summed)) <= abs(cross) / (2 * norm) + 1e-5 * norm


def test_clipping_with_one_micro_batch_equals_clip_grad_norm():
    """With one micro-batch per update the norm is exact, and clipped training equals clip_grad_norm_'s."""
    generator = torch.Generator().manual_seed(2)
    batches = [[torch.randn(8, 24, generator=generator)] for _ in range(4)]
    results = []
    for per_layer in (False, True):
        model, opt = make()
        update(model, opt, batches[0], clip=0.05)
        handle = enable_per_layer_steps(opt, accumulation_steps=1) if per_layer else None
        norms = []
        for batch in batches[1:]:
            loss(model, batch[0]).backward()
            if handle is None:
                norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05))
            else:
                norms.append(handle.clip_grad_norm_(0.05))
            opt.step()
            opt.zero_grad()
        results.append((model, norms))
    (ordinary, ordinary_norms), (layered, layered_norms) = results
    assert min(ordinary_norms) > 0.05  # every compared step clips
    torch.testing.assert_close(torch.stack(layered_norms), torch.stack(ordinary_norms), rtol=1e-5, atol=0)
    for a, b in zip(ordinary.parameters(), layered.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=step_tolerance(3))


@pytest.mark.parametrize("bits", [32, 8])
def test_resume_at_the_boundary_is_exact_and_mid_update_is_refused(bits):
    if bits == 8:
        pytest.importorskip("bitsandbytes")
    batches = micro_batches(5)
    keys = dict(update_proj_gap=2, residual_ratio=0.05, residual_warmup=1, full_rank_residual=True)
    model, opt = make(bits, **keys)
    handle = enable_per_layer_steps(opt, accumulation_steps=K)
    for batch in batches[:2]:
        update(model, opt, batch, clip=1.0, handle=handle)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    loss(model, batches[2][0]).backward()
    with pytest.raises(RuntimeError, match="at the boundary, after optimizer.step"):
        opt.state_dict()
    for x in batches[2][1:]:
        loss(model, x).backward()
    opt.step()
    opt.zero_grad()
    for batch in batches[3:]:
        update(model, opt, batch, clip=1.0, handle=handle)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed, resumed_opt = make(bits, **keys)
    resumed.load_state_dict(saved["model"])
    resumed_opt.load_state_dict(saved["opt"])
    resumed_handle = enable_per_layer_steps(resumed_opt, accumulation_steps=K)
    for batch in batches[2:]:
        update(resumed, resumed_opt, batch, clip=1.0, handle=resumed_handle)
    for name, param in resumed.named_parameters():
        assert (param.detach() - saved["model"][name]).abs().mean() > LR * SCALE / 50, name
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_gradients_are_freed_and_plain_ones_accumulate():
    model, opt = make()
    handle = enable_per_layer_steps(opt, accumulation_steps=K)
    batch = micro_batches(1)[0]
    reference, _ = make()
    for x in batch:
        loss(model, x).backward()
        loss(reference, x).backward()
        assert model.up.weight.grad is None and model.down.weight.grad is None
        assert torch.equal(model.up.bias.grad, reference.up.bias.grad)
    # up (48, 24), right side: R 48 x 8 float32 and one float64 per row; down (24, 48), left: R 8 x 48, one per column
    assert handle.accumulator_bytes() == 2 * (4 * 8 * 48 + 8 * 48)
    with pytest.raises(RuntimeError, match=f"accumulation_steps={K}"):
        loss(model, batch[0]).backward()
    opt.step()
    assert handle.accumulator_bytes() == 0 and opt.state[model.up.weight]["step"] == 1


@pytest.mark.parametrize("keys, key", [
    (dict(update_rule="apollo", projector="random", scale=1.0), "update_rule"),
    (dict(projector="random"), "projector"),
    (dict(full_rank_residual=True, scale="auto"), "scale"),
    (dict(residual_ratio=0.05, residual_warmup=0), "residual_warmup"),
])
def test_what_accumulation_cannot_do_is_refused_naming_the_key(keys, key):
    _, opt = make(**keys)
    with pytest.raises(ValueError, match=f"param group 1, key '{key}': not supported with per-layer accumulation"):
        enable_per_layer_steps(opt, accumulation_steps=2)


def test_an_expert_stack_is_refused_naming_the_group_and_key():
    stack = nn.Parameter(torch.randn(3, 12, 8))
    opt = GaLorePlusAdamW([{"params": [stack], "rank": 2}])
    with pytest.raises(ValueError, match="param group 0, key 'rank': not supported with per-layer accumulation .*stacks"):
        enable_per_layer_steps(opt, accumulation_steps=2)


def test_bad_accumulation_steps_and_clipping_without_accumulation_are_refused():
    _, opt = make()
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="accumulation_steps must be an int"):
            enable_per_layer_steps(opt, accumulation_steps=bad)
    with pytest.raises(RuntimeError, match="accumulation_steps=k"):
        enable_per_layer_steps(opt).clip_grad_norm_(1.0)


def test_full_rank_residual_with_one_micro_batch_equals_a_float64_reference():
    """With one micro-batch, galore_plus.step.accumulate's Fira is Fira with the previous update's N: a dense float64
    re-implementation on fixed gradients (the loss is linear in the weight), svd basis of step 1 (right side)."""
    generator = torch.Generator().manual_seed(3)
    weight = nn.Parameter(torch.randn(48, 24, generator=generator))
    grads = [torch.randn(48, 24, generator=generator) * (1 + t) for t in range(5)]
    start = weight.detach().double().clone()
    lr, wd, alpha, limit, (beta1, beta2), eps = LR, 0.1, SCALE, 1.01, (0.9, 0.999), 1e-8
    opt = GaLorePlusAdamW([{"params": [weight], "rank": 8, "projector": "svd", "update_proj_gap": 100, "scale": alpha,
                            "full_rank_residual": True}], lr=lr, weight_decay=wd)
    enable_per_layer_steps(opt, accumulation_steps=1)
    for grad in grads:
        (weight * grad).sum().backward()
        opt.step()

    w = start
    basis = torch.linalg.svd(grads[0].double(), full_matrices=False)[2][:8]
    m = v = torch.zeros(48, 8, dtype=torch.float64)
    previous_direction_norm = previous_norm = None
    for t, grad in enumerate(grads, 1):
        g = grad.double()
        r = g @ basis.t()
        m, v = beta1 * m + (1 - beta1) * r, beta2 * v + (1 - beta2) * r * r
        n = (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt() + eps)
        if previous_direction_norm is not None:
            c = previous_direction_norm / (r.norm(dim=1, keepdim=True) + 1e-8)
            s = c * (g - alpha * r @ basis)
            measured = s.norm() / ((1 - beta2 ** (t - 1)) ** 0.5 / (1 - beta1 ** (t - 1)))
            divisor = 1.0 if previous_norm is None else max(measured / (previous_norm + 1e-8), limit) / limit
            w = w - lr * s / divisor
            previous_norm = measured / divisor
        w = w * (1 - lr * wd) - lr * alpha * n @ basis
        previous_direction_norm = n.norm(dim=1, keepdim=True)
    assert (w - start).abs().mean() > lr * alpha
    torch.testing.assert_close(weight.detach().double(), w, rtol=0, atol=len(grads) * lr * 3.2 * 64 * EPS32)
