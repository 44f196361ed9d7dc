"""update_rule 'frugal', 'ldadam' and 'scale' (galore_plus/rules/frugal.py, ldadam.py, scale.py):
each against a dense float64 re-implementation over refreshes, the cases where it reduces to a known update, stacks,
checkpoints, the memory estimate, and what each refuses. Non-finite gradients: tests/test_weight_step.py (every
rule of the table)."""

import io
import math

import pytest
import torch

from galore_plus import GaLorePlusAdamW
from galore_plus.memory import estimate_memory
from galore_plus.per_layer import enable_per_layer_steps
from galore_plus.rules.base import UpdateInputs
from galore_plus.rules.ldadam import ldadam_rule
from galore_plus.rules.muon import muon_rule
from galore_plus.rules.scale import scale_rule

RULES = ("frugal", "ldadam", "scale")
LR, DECAY, BETAS, EPS = 2e-2, 0.05, (0.9, 0.999), 1e-8
# Float32 rounding (2^-24 relative per operation) over 7 steps of a few dozen operations each stays orders of
# magnitude below this, relative to how far the weight moved; a dropped term or swapped sign moves it by O(lr).
RELATIVE = 1e-5


def gradients(shape, steps, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) for _ in range(steps)]


def group(rule, weights, **extra):
    return {"params": weights, "rank": 3, "projector": "svd", "update_rule": rule, "update_proj_gap": 3,
            "scale": 0.5, **extra}


def train(rule, start, grads, **extra):
    """(final weight, the stored basis after every step) of a run of ``rule`` from ``start``."""
    weight = torch.nn.Parameter(start.clone())
    opt = GaLorePlusAdamW([group(rule, [weight], **extra)], lr=LR, betas=BETAS, eps=EPS, weight_decay=DECAY)
    bases = []
    for grad in grads:
        weight.grad = grad.clone()
        opt.step()
        bases.append(opt.state[weight]["projector"].double())
    return weight.detach().double(), bases


def back(low_rank, basis, side):
    return basis @ low_rank if side == "left" else low_rank @ basis


def project(grad, basis, side):
    return basis.t() @ grad if side == "left" else grad @ basis.t()


class Adam:
    """Adam's moments of R and the bias-corrected direction N, float64."""

    def __init__(self):
        self.m = self.v = None
        self.t = 0

    def __call__(self, low_rank):
        self.t += 1
        b1, b2 = BETAS
        self.m = (1 - b1) * low_rank if self.m is None else b1 * self.m + (1 - b1) * low_rank
        self.v = (1 - b2) * low_rank**2 if self.v is None else b2 * self.v + (1 - b2) * low_rank**2
        return (self.m / (1 - b1**self.t)) / ((self.v / (1 - b2**self.t)).sqrt() + EPS)


def frugal_reference(start, grads, bases, side, scale, ratio):
    """p <- p (1 - lr wd) - lr (scale P N + ratio sign(G - P R)), N Adam's direction of R = P^T G."""
    weight, adam = start.double(), Adam()
    for grad, basis in zip(grads, bases):
        grad = grad.double()
        low_rank = project(grad, basis, side)
        update = scale * back(adam(low_rank), basis, side) + ratio * (grad - back(low_rank, basis, side)).sign()
        weight = weight * (1 - LR * DECAY) - LR * update
    return weight


def ldadam_reference(start, grads, bases, side, scale):
    """A = G + E, R = P^T A, p <- p (1 - lr wd) - lr scale P N, E <- A - P R; also the A of every step."""
    weight, adam, error, corrected = start.double(), Adam(), torch.zeros_like(start, dtype=torch.float64), []
    for grad, basis in zip(grads, bases):
        total = grad.double() + error
        corrected.append(total)
        low_rank = project(total, basis, side)
        weight = weight * (1 - LR * DECAY) - LR * scale * back(adam(low_rank), basis, side)
        error = total - back(low_rank, basis, side)
    return weight, corrected


def scale_reference(start, grads, bases, side, scale):
    """M <- b1 M + (1 - b1) R, N = M / (1 - b1^t), D = P N + (G - P R), p <- p (1 - lr wd) - lr scale 0.2 sqrt(m) C(D)."""
    weight, momentum, b1 = start.double(), None, BETAS[0]
    for t, (grad, basis) in enumerate(zip(grads, bases), start=1):
        grad = grad.double()
        low_rank = project(grad, basis, side)
        momentum = (1 - b1) * low_rank if momentum is None else b1 * momentum + (1 - b1) * low_rank
        direction = back(momentum / (1 - b1**t) - low_rank, basis, side) + grad
        normalized = direction / direction.norm(dim=0, keepdim=True)
        weight = weight * (1 - LR * DECAY) - LR * scale * 0.2 * math.sqrt(grad.shape[0]) * normalized
    return weight


def assert_matches(ours, reference, start):
    moved = (reference - start.double()).abs().max().item()
    assert moved > 1e-2
    assert (ours - reference).abs().max().item() < RELATIVE * max(1.0, moved)


SHAPES = [((12, 8), "right"), ((8, 12), "left")]


@pytest.mark.parametrize("shape, side", SHAPES)
@pytest.mark.parametrize("ratio", [1.0, 0.3])
def test_frugal_equals_a_dense_float64_reimplementation_over_refreshes(shape, side, ratio):
    start, grads = torch.randn(shape, generator=torch.Generator().manual_seed(1)), gradients(shape, 7)
    ours, bases = train("frugal", start, grads, free_lr_ratio=ratio)
    assert not torch.equal(bases[0], bases[3]) and not torch.equal(bases[3], bases[6])  # refreshed at t = 4, 7
    assert_matches(ours, frugal_reference(start, grads, bases, side, 0.5, ratio), start)


@pytest.mark.parametrize("shape", [(12, 8), (8, 12)])
def test_frugal_without_its_state_free_part_is_the_galore_rule(shape):
    """free_lr_ratio=0 leaves scale P N: update_rule 'galore' without Fira's residual (tested against galore_torch)."""
    start, grads = torch.randn(shape, generator=torch.Generator().manual_seed(1)), gradients(shape, 7)
    frugal, _ = train("frugal", start, grads, free_lr_ratio=0.0)
    galore, _ = train("galore", start, grads, full_rank_residual=False)
    assert torch.equal(frugal, galore)


@pytest.mark.parametrize("shape, side", SHAPES)
def test_ldadam_equals_a_dense_float64_reimplementation_and_refreshes_from_the_corrected_gradient(shape, side):
    start, grads = torch.randn(shape, generator=torch.Generator().manual_seed(1)), gradients(shape, 7)
    ours, bases = train("ldadam", start, grads)
    reference, corrected = ldadam_reference(start, grads, bases, side, 0.5)
    assert_matches(ours, reference, start)
    for t in (0, 3, 6):   # refreshes: the basis spans the top singular vectors of G + E, not of G
        u, _, vh = torch.linalg.svd(corrected[t])
        expected = u[:, :3] if side == "left" else vh[:3].t()
        stored = bases[t] if side == "left" else bases[t].t()
        assert (stored @ stored.t() - expected @ expected.t()).abs().max() < 1e-5
    u, _, vh = torch.linalg.svd(grads[3].double())
    plain = u[:, :3] if side == "left" else vh[:3].t()
    stored = bases[3] if side == "left" else bases[3].t()
    assert (stored @ stored.t() - plain @ plain.t()).abs().max() > 1e-2  # E changed the subspace chosen at t = 4


def test_ldadam_keeps_the_part_outside_the_subspace_and_adds_it_to_the_next_gradient():
    """Between refreshes E only sums what the subspace drops (P^T E = 0), so the weight steps as GaLore's does."""
    start, grads = torch.randn(12, 8, generator=torch.Generator().manual_seed(1)), gradients((12, 8), 3)
    weight = torch.nn.Parameter(start.clone())
    opt = GaLorePlusAdamW([group("ldadam", [weight], update_proj_gap=10)], lr=LR, betas=BETAS, eps=EPS,
                          weight_decay=DECAY)
    for grad in grads:
        weight.grad = grad.clone()
        opt.step()
    basis = opt.state[weight]["projector"]
    expected = sum(grad - grad @ basis.t() @ basis for grad in grads)
    torch.testing.assert_close(opt.state[weight]["error_feedback"], expected, atol=1e-5, rtol=0)
    galore, _ = train("galore", start, grads, full_rank_residual=False, update_proj_gap=10)
    torch.testing.assert_close(weight.detach().double(), galore, atol=1e-6, rtol=0)


@pytest.mark.parametrize("shape, side", SHAPES)
def test_scale_equals_a_dense_float64_reimplementation_over_refreshes(shape, side):
    start, grads = torch.randn(shape, generator=torch.Generator().manual_seed(1)), gradients(shape, 7)
    ours, bases = train("scale", start, grads)
    assert_matches(ours, scale_reference(start, grads, bases, side, 0.5), start)


@pytest.mark.parametrize("beta1", [0.9, 0.0])
def test_scale_with_a_full_rank_basis_is_scales_column_normalised_momentum_step(beta1):
    """r = min(m, n), no refresh after the first step: D is the momentum of G, and the step SCALE's
    theta <- theta - eta C(m_t) (its output layer; beta1 = 0: C(G), its hidden layers), eta = lr 0.2 sqrt(m)."""
    start, grads = torch.randn(12, 8, generator=torch.Generator().manual_seed(1)), gradients((12, 8), 6)
    weight = torch.nn.Parameter(start.clone())
    with pytest.warns(UserWarning, match="rank 8 is not below"):
        opt = GaLorePlusAdamW([group("scale", [weight], rank=8, update_proj_gap=100, scale=1.0)], lr=LR,
                              betas=(beta1, 0.999), weight_decay=0.0)
    reference, momentum = start.double(), torch.zeros(12, 8, dtype=torch.float64)
    for grad in grads:
        weight.grad = grad.clone()
        opt.step()
        momentum = beta1 * momentum + (1 - beta1) * grad.double()
        reference = reference - LR * 0.2 * math.sqrt(12) * momentum / momentum.norm(dim=0, keepdim=True)
    assert_matches(weight.detach().double(), reference, start)


@pytest.mark.parametrize("rule", RULES)
def test_a_stack_equals_its_experts_stepped_as_separate_weights(rule):
    stack = torch.nn.Parameter(torch.randn(2, 12, 8, generator=torch.Generator().manual_seed(3)))
    experts = [torch.nn.Parameter(stack.detach()[e].clone()) for e in range(2)]
    batched = GaLorePlusAdamW([group(rule, [stack])], lr=LR, weight_decay=DECAY)
    separate = GaLorePlusAdamW([group(rule, experts)], lr=LR, weight_decay=DECAY)
    for grad in gradients((2, 12, 8), 7):
        stack.grad = grad.clone()
        for e, expert in enumerate(experts):
            expert.grad = grad[e].clone()
        batched.step()
        separate.step()
    start = torch.randn(2, 12, 8, generator=torch.Generator().manual_seed(3))
    assert (stack.detach() - start).abs().max() > 1e-2
    for e, expert in enumerate(experts):
        torch.testing.assert_close(stack.detach()[e], expert.detach(), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("rule", RULES)
def test_per_layer_steps_equal_ordinary_steps(rule):
    model, copy = torch.nn.Linear(8, 12, bias=False), torch.nn.Linear(8, 12, bias=False)
    copy.load_state_dict(model.state_dict())
    ordinary = GaLorePlusAdamW([group(rule, [model.weight])], lr=LR)
    per_layer = GaLorePlusAdamW([group(rule, [copy.weight])], lr=LR)
    enable_per_layer_steps(per_layer)
    for x in gradients((5, 8), 5):
        model(x).square().sum().backward()
        ordinary.step()
        ordinary.zero_grad()
        copy(x).square().sum().backward()
        per_layer.step()
    assert torch.equal(model.weight, copy.weight)


@pytest.mark.parametrize("bits", [32, 8])
@pytest.mark.parametrize("rule", RULES)
def test_weights_only_checkpoint_resumes_bit_exactly_across_a_refresh(rule, bits):
    if bits == 8:
        pytest.importorskip("bitsandbytes")
    grads = gradients((2, 12, 8), 7)

    def build(weights):
        return GaLorePlusAdamW([group(rule, weights[:1]), group(rule, weights[1:], rank=2)], lr=LR,
                               weight_decay=DECAY, optim_bits=bits)

    def run(opt, weights, steps):
        for grad in steps:
            weights[0].grad, weights[1].grad = grad[0].clone(), grad[1].t().clone()
            opt.step()

    start = [torch.randn(12, 8), torch.randn(8, 12)]
    straight_weights = [torch.nn.Parameter(w.clone()) for w in start]
    straight = build(straight_weights)
    run(straight, straight_weights, grads[:2])
    buffer = io.BytesIO()
    torch.save(straight.state_dict(), buffer)
    snapshot = [w.detach().clone() for w in straight_weights]
    run(straight, straight_weights, grads[2:])
    resumed_weights = [torch.nn.Parameter(w.clone()) for w in snapshot]
    resumed = build(resumed_weights)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    run(resumed, resumed_weights, grads[2:])
    for mine, expected, before in zip(resumed_weights, straight_weights, snapshot):
        assert not torch.equal(expected, before)
        assert torch.equal(mine, expected)


def test_a_checkpoint_whose_error_buffer_has_another_shape_is_refused():
    weight = torch.nn.Parameter(torch.randn(12, 8))
    opt = GaLorePlusAdamW([group("ldadam", [weight])], lr=LR)
    weight.grad = torch.randn(12, 8)
    opt.step()
    saved = opt.state_dict()
    saved["state"][0]["error_feedback"] = torch.zeros(8, 12)
    with pytest.raises(ValueError, match="state key 'error_feedback'"):
        GaLorePlusAdamW([group("ldadam", [torch.nn.Parameter(torch.randn(12, 8))])], lr=LR).load_state_dict(saved)


@pytest.mark.parametrize("bits", [32, 8])
@pytest.mark.parametrize("rule", RULES)
def test_the_memory_estimate_equals_the_state_allocated(rule, bits):
    """ldadam's error buffer (m n float32 values, also for a bfloat16 weight) is counted; frugal and scale keep only
    the basis and the two moments."""
    if bits == 8:
        pytest.importorskip("bitsandbytes")
    weights = [torch.nn.Parameter(torch.randn(64, 80)), torch.nn.Parameter(torch.randn(48, 96).bfloat16()),
               torch.nn.Parameter(torch.randn(3, 24, 40).bfloat16())]
    groups = [group(rule, weights, rank=8)]
    opt = GaLorePlusAdamW(groups, lr=LR, optim_bits=bits)
    for _ in range(2):
        for weight in weights:
            weight.grad = torch.randn(weight.shape).to(weight.dtype)
        opt.step()
    allocated = sum(v.nbytes for state in opt.state.values() for v in state.values() if torch.is_tensor(v))
    assert estimate_memory(groups, bits).optimizer_state == allocated
    buffers = sum(4 * w.numel() for w in weights) if rule == "ldadam" else 0
    assert allocated - estimate_memory([group("galore", weights, rank=8)], bits).optimizer_state == buffers


@pytest.mark.parametrize("rule, extra, key", [
    ("frugal", {"scale": "auto"}, "scale"), ("ldadam", {"scale": "auto"}, "scale"), ("scale", {"scale": -1.0}, "scale"),
    ("frugal", {"free_lr_ratio": -0.5}, "free_lr_ratio"), ("frugal", {"free_lr_ratio": "1"}, "free_lr_ratio"),
    ("frugal", {"free_lr_ratio": math.inf}, "free_lr_ratio"),
    ("ldadam", {"free_lr_ratio": 0.5}, "free_lr_ratio"),   # read by 'frugal' only
    ("frugal", {"full_rank_residual": True}, "full_rank_residual"),
    ("ldadam", {"full_rank_residual": True}, "full_rank_residual"),
    ("scale", {"residual_ratio": 0.01}, "residual_ratio"), ("frugal", {"residual_ratio": 0.01}, "residual_ratio"),
])
def test_what_a_rule_does_not_do_is_refused_naming_the_group_and_key(rule, extra, key):
    weight = torch.nn.Parameter(torch.randn(12, 8))
    with pytest.raises((ValueError, TypeError), match=rf"param group 0 \('w'\), key '{key}'"):
        GaLorePlusAdamW([{"params": [weight], "rank": 3, "name": "w", "update_rule": rule, **extra}])


@pytest.mark.parametrize("rule", RULES + ("muon",))
def test_per_layer_accumulation_is_refused_naming_the_group_and_key(rule):
    weight = torch.nn.Parameter(torch.randn(12, 8))
    opt = GaLorePlusAdamW([{"params": [weight], "rank": 3, "name": "w", "update_rule": rule}])
    with pytest.raises(ValueError, match=r"param group 0 \('w'\), key 'update_rule'.*reads the full gradient"):
        enable_per_layer_steps(opt, accumulation_steps=2)


@pytest.mark.parametrize("rule, apply", [("ldadam", ldadam_rule), ("scale", scale_rule), ("muon", muon_rule)])
def test_fsdp2_row_shards_are_refused(rule, apply):
    """A process holding some of the weight's rows (FSDP2): these rules are not implemented there (frugal is:
    tests/test_distributed.py)."""
    rows = torch.zeros(6, 8)
    inputs = UpdateInputs(rows, (12, 8), torch.zeros(6, 8), torch.zeros(6, 3), torch.zeros(6, 3), torch.eye(3, 8),
                          "right", 1, torch.tensor(True))
    with pytest.raises(NotImplementedError, match=f"update_rule '{rule}' is not implemented for FSDP2 row shards"):
        apply(inputs, {}, {"lr": LR, "weight_decay": 0.0, "scale": 1.0, "free_lr_ratio": 1.0})
