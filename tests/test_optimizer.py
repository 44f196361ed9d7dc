"""GaLorePlusAdamW: AdamW equivalence, GaLore equivalence, semantics, resume, RNG isolation, bad input."""

import copy
import io
import pickle
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from galore_plus import GaLorePlusAdamW
from galore_plus.step import row_blocks
from galore_plus.step.rounding import spacing

PROJECTORS = ["svd", "randomized", "cross_head"]  # projectors that store their basis
ALL_PROJECTORS = PROJECTORS + ["random"]  # "random" regenerates it (its update: tests/test_random_basis.py)


def gradient_stream(shapes, steps, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(shape, generator=generator) for shape in shapes] for _ in range(steps)]


def run(optimizer, params, stream):
    for grads in stream:
        for param, grad in zip(params, grads):
            param.grad = grad.to(param.dtype).clone()
        optimizer.step()


def projected_group(param, projector, **options):
    group = {"params": [param], "rank": 4, "update_proj_gap": 3, "scale": 0.5, "projector": projector}
    if projector == "cross_head":
        group["num_heads"] = param.shape[0] // 4
    group.update(options)
    return group


# ---------------------------------------------------------------- plain groups are torch's AdamW


@settings(max_examples=10, deadline=None, derandomize=True)
@given(
    shapes=st.lists(st.tuples(st.integers(1, 6), st.integers(1, 6)), min_size=1, max_size=3),
    weight_decay=st.sampled_from([0.0, 1e-2, 0.3]),
    lr=st.sampled_from([1e-3, 0.1]),
)
def test_groups_without_rank_equal_torch_adamw_bit_for_bit(shapes, weight_decay, lr):
    ours = [torch.nn.Parameter(torch.randn(shape)) for shape in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    stream = gradient_stream(shapes, 4)
    run(GaLorePlusAdamW(ours, lr=lr, weight_decay=weight_decay), ours, stream)
    run(torch.optim.AdamW(theirs, lr=lr, weight_decay=weight_decay), theirs, stream)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)


def test_defaults_are_torch_adamw_defaults():
    ours = GaLorePlusAdamW([torch.nn.Parameter(torch.zeros(1))]).defaults
    theirs = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))]).defaults
    for key in ("lr", "betas", "eps", "weight_decay"):
        assert ours[key] == theirs[key]


# ---------------------------------------------------------------- GaLore semantics, re-implemented here


class ReferenceGaLore:
    """An independent dense re-implementation of the documented update for one weight."""

    def __init__(self, weight, rank, gap, scale, lr, betas, eps, weight_decay, side, basis_of):
        self.weight, self.rank, self.gap, self.scale = weight.clone(), rank, gap, scale
        self.lr, self.betas, self.eps, self.weight_decay, self.side = lr, betas, eps, weight_decay, side
        self.basis_of = basis_of
        self.t, self.m, self.v, self.basis = 0, None, None, None

    def step(self, grad):
        self.t += 1
        if (self.t - 1) % self.gap == 0:
            self.basis = self.basis_of(grad, self.t)
        b = self.basis
        r = b.t() @ grad if self.side == "left" else grad @ b.t()
        if self.m is None:
            self.m, self.v = torch.zeros_like(r), torch.zeros_like(r)
        beta1, beta2 = self.betas
        self.m = beta1 * self.m + (1 - beta1) * r
        self.v = beta2 * self.v + (1 - beta2) * r * r
        n = (self.m / (1 - beta1**self.t)) / ((self.v / (1 - beta2**self.t)).sqrt() + self.eps)
        u = self.scale * (b @ n if self.side == "left" else n @ b)
        self.weight = self.weight * (1 - self.lr * self.weight_decay) - self.lr * u


def exact_svd_basis(side, rank):
    def basis_of(grad, _t):
        u, _, vh = torch.linalg.svd(grad.double(), full_matrices=False)
        return (u[:, :rank] if side == "left" else vh[:rank]).float()
    return basis_of


@pytest.mark.parametrize(
    "shape, proj_type, side",
    [((12, 8), "std", "right"), ((8, 12), "std", "left"), ((12, 8), "reverse_std", "left"),
     ((12, 8), "left", "left"), ((8, 12), "right", "right")],
)
def test_svd_projector_is_galore(shape, proj_type, side):
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(shape))
    reference = ReferenceGaLore(weight.detach(), 3, 4, 0.25, 1e-2, (0.9, 0.999), 1e-8, 0.1, side, exact_svd_basis(side, 3))
    opt = GaLorePlusAdamW([{"params": [weight], "rank": 3, "update_proj_gap": 4, "scale": 0.25,
                            "proj_type": proj_type, "projector": "svd"}], lr=1e-2, weight_decay=0.1)
    for (grad,) in gradient_stream([shape], 9):
        weight.grad = grad
        opt.step()
        reference.step(grad)
        torch.testing.assert_close(weight.detach(), reference.weight, atol=1e-5, rtol=1e-5)
    assert opt.state[weight]["projector"].shape == ((shape[0], 3) if side == "left" else (3, shape[1]))


@pytest.mark.parametrize("projector", PROJECTORS)
def test_every_projector_follows_the_documented_update_with_its_own_basis(projector):
    """GaLore's update (the full-rank residual, default for the GaLore+ projectors, switched off) with each basis."""
    torch.manual_seed(1)
    weight = torch.nn.Parameter(torch.randn(16, 12))
    opt = GaLorePlusAdamW([projected_group(weight, projector, full_rank_residual=False)], lr=3e-2, weight_decay=0.05)
    side = "right"
    reference = ReferenceGaLore(weight.detach(), 4, 3, 0.5, 3e-2, (0.9, 0.999), 1e-8, 0.05, side,
                                basis_of=lambda grad, t: opt.state[weight]["projector"].clone())
    seen = []
    for (grad,) in gradient_stream([(16, 12)], 8):
        weight.grad = grad
        opt.step()
        reference.step(grad)
        seen.append(opt.state[weight]["projector"].clone())
        torch.testing.assert_close(weight.detach(), reference.weight, atol=1e-5, rtol=1e-5)
    changed = [t for t in range(1, 8) if not torch.equal(seen[t], seen[t - 1])]
    assert changed == [3, 6]  # refreshed on t = 4 and t = 7 (0-based positions 3 and 6) with gap 3


def test_moments_are_not_reset_at_a_refresh_and_step_counts_from_one():
    weight = torch.nn.Parameter(torch.randn(10, 6))
    opt = GaLorePlusAdamW([projected_group(weight, "svd", update_proj_gap=2)])
    weight.grad = torch.randn(10, 6)
    opt.step()
    assert opt.state[weight]["step"] == 1
    before = opt.state[weight]["exp_avg"].clone()
    weight.grad = torch.zeros(10, 6)
    opt.step()
    weight.grad = torch.zeros(10, 6)
    opt.step()  # t = 3 refreshes the basis; moments only decay
    assert opt.state[weight]["step"] == 3
    torch.testing.assert_close(opt.state[weight]["exp_avg"], before * 0.9**2)


@pytest.mark.parametrize("block_values", [None, 8, 30])
@pytest.mark.parametrize("shape, side", [((12, 8), "right"), ((8, 12), "left")])
def test_bfloat16_weight_uses_float32_gradient_math_and_float32_state(shape, side, block_values, monkeypatch):
    """Also with the bfloat16 gradient and weight handled a block of rows at a time (1 to 3 rows; None: one block)."""
    if block_values is not None:
        monkeypatch.setattr(row_blocks, "ROW_BLOCK_VALUES", block_values)
    torch.manual_seed(0)
    weight = torch.nn.Parameter((torch.randn(shape) * 0.02).bfloat16())
    start = weight.detach().float().clone()
    opt = GaLorePlusAdamW([projected_group(weight, "svd")], lr=1e-2)
    reference = ReferenceGaLore(start, 4, 3, 0.5, 1e-2, (0.9, 0.999), 1e-8, 1e-2, side, exact_svd_basis(side, 4))
    for (grad,) in gradient_stream([shape], 4):  # t = 4 refreshes the basis
        weight.grad = grad.bfloat16()
        opt.step()
        reference.step(grad.bfloat16().float())
        reference.weight = reference.weight.bfloat16().float()  # the weight is stored in bfloat16 after each step
    assert opt.state[weight]["exp_avg"].dtype == torch.float32
    assert opt.state[weight]["projector"].dtype == torch.float32
    ulp = spacing(reference.weight, torch.bfloat16)
    moved = (reference.weight - start).abs()
    assert moved.median() > 10 * ulp.max()  # one bfloat16 spacing is far below the movement checked against
    assert ((weight.detach().float() - start).abs() > ulp).float().mean() > 0.9
    # float32 rounding differences may flip a bfloat16 rounding: at most one spacing apart
    assert ((weight.detach().float() - reference.weight).abs() <= ulp).all()


def test_mixed_plain_and_projected_groups_and_none_gradients():
    plain = torch.nn.Parameter(torch.randn(5))
    projected = torch.nn.Parameter(torch.randn(8, 8))
    idle = torch.nn.Parameter(torch.randn(8, 8))
    opt = GaLorePlusAdamW([{"params": [plain]}, projected_group(projected, "randomized") | {"params": [projected, idle]}])
    plain.grad, projected.grad = torch.randn(5), torch.randn(8, 8)
    before = idle.detach().clone()
    opt.step()
    assert torch.equal(idle, before) and len(opt.state[idle]) == 0
    assert opt.state[projected]["step"] == 1 and float(opt.state[plain]["step"]) == 1.0


# ---------------------------------------------------------------- checkpoint / resume


def make_model_and_optimizer(projector, dtype=torch.float32, seed=0):
    """Weights of size 0.02, where a bfloat16 spacing (at most 2.4e-4) is far below one step (about 1e-3 to 1e-2)."""
    torch.manual_seed(seed)
    weight = torch.nn.Parameter(torch.randn(16, 12, dtype=dtype) * 0.02)
    bias = torch.nn.Parameter(torch.randn(16, dtype=dtype) * 0.02)
    opt = GaLorePlusAdamW([{"params": [bias]}, projected_group(weight, projector)], lr=1e-2, seed=7)
    return [bias, weight], opt


def assert_moved(after, before, lr):
    """Every tensor moved by a mean of at least lr / 10 per element: a no-op optimizer fails this."""
    for a, b in zip(after, before):
        assert (a.detach().float() - b.detach().float()).abs().mean() > lr / 10


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("projector", ALL_PROJECTORS)
def test_save_load_weights_only_and_continue_equals_never_stopping(projector, dtype):
    stream = gradient_stream([(16,), (16, 12)], 10, seed=3)
    params, opt = make_model_and_optimizer(projector, dtype)
    run(opt, params, stream)

    params_a, opt_a = make_model_and_optimizer(projector, dtype)
    run(opt_a, params_a, stream[:5])
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in params_a], "optimizer": opt_a.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)

    params_b, opt_b = make_model_and_optimizer(projector, dtype, seed=99)
    with torch.no_grad():
        for p, saved in zip(params_b, checkpoint["params"]):
            p.copy_(saved)
    opt_b.load_state_dict(checkpoint["optimizer"])
    run(opt_b, params_b, stream[5:])
    assert_moved(params_b, checkpoint["params"], lr=1e-2)
    for never_stopped, resumed in zip(params, params_b):
        assert torch.equal(never_stopped, resumed)


def test_state_dict_holds_only_tensors_and_plain_values():
    params, opt = make_model_and_optimizer("cross_head")
    run(opt, params, gradient_stream([(16,), (16, 12)], 2))

    def check(value):
        if isinstance(value, dict):
            for key, item in value.items():
                assert isinstance(key, (str, int))
                check(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                check(item)
        else:
            assert value is None or isinstance(value, (torch.Tensor, int, float, str, bool)), type(value)

    check(opt.state_dict())


# ---------------------------------------------------------------- randomness


@pytest.mark.parametrize("projector", ["randomized", "cross_head"])
def test_projectors_never_touch_the_global_rng(projector):
    params, opt = make_model_and_optimizer(projector)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    run(opt, params, gradient_stream([(16,), (16, 12)], 7))
    assert torch.equal(torch.get_rng_state(), state)


def test_same_seed_gives_same_bases_on_every_process_and_other_seeds_differ():
    stream = gradient_stream([(16,), (16, 12)], 4)
    bases = []
    for seed in (7, 7, 8):
        torch.manual_seed(seed * 31)  # a different global RNG state per "process"
        weight = torch.nn.Parameter(torch.ones(16, 12))
        bias = torch.nn.Parameter(torch.ones(16))
        opt = GaLorePlusAdamW([{"params": [bias]}, projected_group(weight, "randomized")], seed=seed)
        run(opt, [bias, weight], stream)
        bases.append(opt.state[weight]["projector"])
    assert torch.equal(bases[0], bases[1])
    assert not torch.equal(bases[0], bases[2])


# ---------------------------------------------------------------- robustness


def test_non_finite_gradient_skips_the_step_on_the_device_and_warns_at_state_dict():
    weight = torch.nn.Parameter(torch.randn(10, 8))
    opt = GaLorePlusAdamW([projected_group(weight, "randomized", update_proj_gap=10)])
    weight.grad = torch.randn(10, 8)
    opt.step()
    state_before = {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[weight].items()}
    weight_before = weight.detach().clone()
    bad = torch.randn(10, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning during the steps: that would need a host read
        for value in (float("nan"), float("inf"), -float("inf")):
            bad[3, 2] = value
            weight.grad = bad.clone()
            opt.step()  # t = 2, 3, 4: no refresh, low-rank gradient non-finite
    assert torch.equal(weight, weight_before)
    for key, value in state_before.items():
        if key != "step":
            assert torch.equal(opt.state[weight][key], value)
    assert opt.state[weight]["step"] == 4  # skipped steps still count in t
    with pytest.warns(RuntimeWarning, match=r"param group 0 \(3\).*skipped"):
        opt.state_dict()
    weight.grad = torch.randn(10, 8)
    opt.step()
    assert not torch.equal(weight, weight_before) and torch.isfinite(weight).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.state_dict()  # nothing skipped since the last report


def test_skipped_steps_are_reported_at_the_next_refresh():
    weight = torch.nn.Parameter(torch.randn(10, 8))
    opt = GaLorePlusAdamW([projected_group(weight, "svd", update_proj_gap=3)])
    weight.grad = torch.randn(10, 8)
    opt.step()
    weight.grad = torch.full((10, 8), float("nan"))
    opt.step()
    weight.grad = torch.randn(10, 8)
    opt.step()
    weight.grad = torch.randn(10, 8)
    with pytest.warns(RuntimeWarning, match=r"param group 0 \(1\)"):
        opt.step()  # t = 4 refreshes


def test_non_finite_gradient_at_a_refresh_keeps_the_previous_basis():
    weight = torch.nn.Parameter(torch.randn(10, 8))
    opt = GaLorePlusAdamW([projected_group(weight, "svd", update_proj_gap=1)])
    weight.grad = torch.randn(10, 8)
    opt.step()
    basis = opt.state[weight]["projector"].clone()
    weight.grad = torch.full((10, 8), float("inf"))
    with pytest.warns(RuntimeWarning, match="kept the previous basis"):
        opt.step()
    assert torch.equal(opt.state[weight]["projector"], basis)


def test_first_step_with_nan_gradient_falls_back_to_a_random_orthonormal_basis():
    weight = torch.nn.Parameter(torch.randn(10, 8))
    opt = GaLorePlusAdamW([projected_group(weight, "svd")])
    weight.grad = torch.full((10, 8), float("nan"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.step()
    basis = opt.state[weight]["projector"]
    torch.testing.assert_close(basis @ basis.t(), torch.eye(4), atol=1e-5, rtol=0)
    assert opt.state[weight]["step"] == 1 and not opt.state[weight]["exp_avg"].any()
    assert not opt.state[weight]["exp_avg_sq"].any() and torch.isfinite(weight).all()


def test_failed_decomposition_keeps_the_previous_basis(monkeypatch):
    weight = torch.nn.Parameter(torch.randn(10, 8))
    opt = GaLorePlusAdamW([projected_group(weight, "svd", update_proj_gap=1)])
    weight.grad = torch.randn(10, 8)
    opt.step()
    basis = opt.state[weight]["projector"].clone()

    def failing(*args, **kwargs):
        raise torch.linalg.LinAlgError("did not converge")

    monkeypatch.setattr("galore_plus.step.refresh.compute_basis", failing)
    weight.grad = torch.randn(10, 8)
    with pytest.warns(RuntimeWarning, match="refresh failed"):
        opt.step()
    assert torch.equal(opt.state[weight]["projector"], basis)
    assert opt.state[weight]["step"] == 2


# ---------------------------------------------------------------- bad input


def param(*shape):
    return torch.nn.Parameter(torch.zeros(*shape))


@pytest.mark.parametrize(
    "group, error, words",
    [
        ({"rank": 0}, ValueError, "'rank': must be >= 1"),
        ({"rank": 9}, ValueError, "'rank': 9 exceeds min(m, n)"),
        ({"rank": 2.0}, TypeError, "'rank': must be an int"),
        ({"rank": 2, "update_proj_gap": 0}, ValueError, "'update_proj_gap'"),
        ({"rank": 2, "projector": "qr"}, ValueError, "'projector': must be one of"),
        ({"rank": 2, "proj_type": "full"}, ValueError, "'proj_type': must be one of"),
        ({"rank": 2, "projector": "cross_head"}, ValueError, "'num_heads'"),
        ({"rank": 2, "projector": "cross_head", "num_heads": 5}, ValueError, "'num_heads': 5 does not divide"),
        ({"rank": 9, "projector": "cross_head", "num_heads": 2}, ValueError, "'rank': 9 exceeds the input size"),
        ({"rank": 2, "scale": "big"}, TypeError, "'scale'"),
        ({"rank": 2, "oversample": -1}, ValueError, "'oversample'"),
        ({"rank": 2, "warm_start": 1}, TypeError, "'warm_start'"),
        ({"rank": 2, "head_projector": "eig"}, ValueError, "'head_projector'"),
    ],
)
def test_bad_group_keys_raise_naming_the_group_and_key(group, error, words):
    with pytest.raises(error) as info:
        GaLorePlusAdamW([{"params": [param(3)]}, {"params": [param(8, 8)], "name": "attn", **group}])
    assert "param group 1 ('attn')" in str(info.value)
    assert words in str(info.value)


def test_projected_group_with_a_non_matrix_raises():
    with pytest.raises(ValueError, match=r"param group 0, key 'rank': parameter 1 of shape \(8,\) is 1-D; a projected "
                                         r"weight is a matrix \(m, n\), a stack"):
        GaLorePlusAdamW([{"params": [param(8, 8), param(8)], "rank": 2}])
    with pytest.raises(ValueError, match=r"param group 0, key 'rank': parameter 0 of shape \(2, 2, 2, 2, 2\) is 5-D"):
        GaLorePlusAdamW([{"params": [param(2, 2, 2, 2, 2)], "rank": 1}])


def test_projected_group_with_a_complex_weight_raises():
    weight = torch.nn.Parameter(torch.zeros(4, 4, dtype=torch.complex64))
    with pytest.raises(TypeError, match="only real floating-point"):
        GaLorePlusAdamW([{"params": [weight], "rank": 2}])


def test_projector_keys_in_a_plain_group_raise():
    with pytest.raises(ValueError, match="param group 0, key 'projector'"):
        GaLorePlusAdamW([{"params": [param(4, 4)], "projector": "svd"}])


def test_sparse_gradient_raises_naming_the_group():
    weight = param(4, 4)
    opt = GaLorePlusAdamW([{"params": [weight], "rank": 2}])
    weight.grad = torch.eye(4).to_sparse()
    with pytest.raises(TypeError, match="param group 0.*sparse"):
        opt.step()


def test_add_param_group_validates_too():
    opt = GaLorePlusAdamW([param(3)])
    with pytest.raises(ValueError, match="param group 1"):
        opt.add_param_group({"params": [param(4, 4)], "rank": 5})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("kwargs", [{"lr": -1.0}, {"eps": -1.0}, {"betas": (1.0, 0.9)}, {"weight_decay": -0.1}])
def test_bad_hyperparameters_raise(kwargs):
    with pytest.raises(ValueError):
        GaLorePlusAdamW([param(3)], **kwargs)


def test_galore_torch_style_groups_work_unchanged():
    """A group written for galore_torch (rank, update_proj_gap, scale, proj_type) gets the default projector,
    projects the side galore_torch projects, finds the gradient's top-r subspace and follows the documented update:
    the default projector's, Fira's, U = scale N Q + phi (G - scale R Q), written out here in float64."""
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(12, 8))
    start = weight.detach().clone()
    group = {"params": [weight], "rank": 4, "update_proj_gap": 200, "scale": 0.25, "proj_type": "std"}
    opt = GaLorePlusAdamW([group], lr=1e-3)
    grad = torch.randn(12, 8)
    weight.grad = grad.clone()
    opt.step()
    assert opt.param_groups[0]["projector"] == "randomized"
    basis = opt.state[weight]["projector"]
    assert basis.shape == (4, 8)  # "std" on a tall weight: the input side, galore_torch's "right"
    top = torch.linalg.svd(grad.double(), full_matrices=False)[2][:4]
    torch.testing.assert_close(basis.double().t() @ basis.double(), top.t() @ top, atol=1e-5, rtol=0)
    assert opt.param_groups[0]["full_rank_residual"] is True
    g, q = grad.double(), basis.double()
    low_rank = g @ q.t()                                                     # R (12, 4)
    direction = low_rank / (low_rank.abs() + 1e-8)                         # Adam's N at t = 1
    phi = direction.norm(dim=1, keepdim=True) / (low_rank.norm(dim=1, keepdim=True) + 1e-8)
    update = 0.25 * direction @ q + phi * (g - 0.25 * low_rank @ q)
    expected = start.double() * (1 - 1e-3 * 1e-2) - 1e-3 * update
    one_step = 1e-3 * 0.25
    assert (weight.detach() - start).abs().mean() > one_step / 10
    # the update's two terms (phi G and the back-projection) are added to the float32 weight one after the
    # other: at most two roundings of the weight (a few 1e-7 here, a step is 2.5e-4)
    error = (weight.detach().double() - expected).abs()
    assert (error <= 2 * torch.finfo(torch.float32).eps * expected.abs() + 1e-9).all()


def test_svd_groups_equal_galore_torch_over_several_refreshes():
    """``projector="svd"`` groups against galore_torch.GaLoreAdamW itself, 8 steps with refreshes at t = 1, 4, 7.

    Two conventions of galore_torch differ from torch.optim.AdamW's, which GaLorePlusAdamW follows:

    * weight decay comes after the update, p <- (p - lr s P N)(1 - lr wd), where torch decays first,
      p <- p (1 - lr wd) - lr s P N. The two are the same with our scale set to s (1 - lr wd);
    * eps is added to sqrt(V) before the bias correction, i.e. galore_torch's eps is torch's
      eps * sqrt(1 - b2^t), a different constant every step. With eps = 0 both are the same.

    The bias has no rank and no weight decay: galore_torch's plain AdamW has the same decay order.
    """
    galore_torch = pytest.importorskip("galore_torch")
    lr, weight_decay, scale, gap = 1e-2, 0.1, 0.25, 3
    shapes = [(12, 8), (8, 12), (8,)]  # std projects the input side of the tall weight, the output side of the wide one
    torch.manual_seed(0)
    starts = [torch.randn(shape) for shape in shapes]
    ours = [torch.nn.Parameter(start.clone()) for start in starts]
    theirs = [torch.nn.Parameter(start.clone()) for start in starts]
    ours_opt = GaLorePlusAdamW([
        {"params": ours[:2], "rank": 3, "update_proj_gap": gap, "scale": scale * (1 - lr * weight_decay),
         "proj_type": "std", "projector": "svd", "weight_decay": weight_decay},
        {"params": ours[2:], "weight_decay": 0.0},
    ], lr=lr, eps=0.0)
    theirs_opt = galore_torch.GaLoreAdamW([
        {"params": theirs[:2], "rank": 3, "update_proj_gap": gap, "scale": scale, "proj_type": "std",
         "weight_decay": weight_decay},
        {"params": theirs[2:], "weight_decay": 0.0},
    ], lr=lr, eps=0.0, no_deprecation_warning=True)
    bases = []
    for grads in gradient_stream(shapes, 8, seed=5):
        for params, optimizer in ((ours, ours_opt), (theirs, theirs_opt)):
            for param, grad in zip(params, grads):
                param.grad = grad.clone()
            optimizer.step()
        bases.append(ours_opt.state[ours[0]]["projector"].clone())
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a.detach(), b.detach(), atol=lr * scale * 1e-3, rtol=0)  # a thousandth of one step
    assert [t for t in range(1, 8) if not torch.equal(bases[t], bases[t - 1])] == [3, 6]
    for a, start in zip(ours, starts):
        assert (a.detach() - start).abs().mean() > lr * scale  # 8 steps of about lr * scale each


def test_a_checkpoint_older_than_a_group_key_loads_with_the_default():
    params, opt = make_model_and_optimizer("randomized")
    stream = gradient_stream([(16,), (16, 12)], 4, seed=3)
    run(opt, params, stream[:2])
    saved = opt.state_dict()
    for key in ("basis_bits", "scale_type", "update_rule"):
        del saved["param_groups"][1][key]
    params_b, opt_b = make_model_and_optimizer("randomized")
    with torch.no_grad():
        for p, q in zip(params_b, params):
            p.copy_(q)
    opt_b.load_state_dict(saved)
    run(opt, params, stream[2:])
    run(opt_b, params_b, stream[2:])
    assert opt_b.param_groups[1]["basis_bits"] == 32
    assert torch.equal(params[1], params_b[1])


def two_weights_trained(steps: int = 3, bits: int = 32, **group):
    generator = torch.Generator().manual_seed(7)
    params = [torch.nn.Parameter(torch.randn(8, 6, generator=generator)) for _ in range(2)]
    opt = GaLorePlusAdamW([{"params": params, "rank": 2, **group}], lr=1e-2, optim_bits=bits)
    for _ in range(steps):
        for param in params:
            param.grad = torch.randn(8, 6, generator=generator)
        opt.step()
    return params, opt


@pytest.mark.parametrize("group", [{}, {"residual_ratio": 0.2, "residual_warmup": 1}, {"projector": "svd"}])
@pytest.mark.parametrize("bits", [32, 8])
def test_state_is_restored_by_the_saved_ids_as_torch_does(group, bits):
    """Saved ids renumbered (and swapped): the i-th saved id's state goes to the i-th parameter, with every tensor's
    dtype as saved (residual index int, 8-bit codes uint8), and the next step runs."""
    params, opt = two_weights_trained(bits=bits, **group)
    saved = copy.deepcopy(opt.state_dict())
    renumbered = {"state": {10: saved["state"][1], 20: saved["state"][0]},
                  "param_groups": [{**saved["param_groups"][0], "params": [20, 10]}]}
    fresh = GaLorePlusAdamW([{"params": params, "rank": 2, **group}], lr=1e-2, optim_bits=bits)
    fresh.load_state_dict(renumbered)
    for param, position in zip(params, (0, 1)):
        for key, value in saved["state"][position].items():
            if isinstance(value, torch.Tensor):
                assert fresh.state[param][key].dtype == value.dtype, key
                assert torch.equal(fresh.state[param][key], value), key
    for param in params:
        param.grad = torch.randn(8, 6)
    fresh.step()


def test_deepcopy_and_pickle_keep_what_a_step_and_a_save_read():
    params, opt = two_weights_trained()
    opt.seed = 5
    for copied in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert (copied.seed, copied.optim_bits) == (5, 32)
        for param in copied.param_groups[0]["params"]:
            param.grad = torch.ones(8, 6)
        copied.step()
        copied.state_dict()


def test_named_parameters_in_a_projected_group():
    generator = torch.Generator().manual_seed(0)
    named = [("a.weight", torch.nn.Parameter(torch.randn(8, 6, generator=generator)))]
    plain = [named[0][1].detach().clone().requires_grad_()]
    opts = [GaLorePlusAdamW([{"params": params, "rank": 2}], lr=1e-2) for params in (named, plain)]
    assert opts[0].param_groups[0]["param_names"] == ["a.weight"]
    for _ in range(3):
        grad = torch.randn(8, 6, generator=generator)
        for opt in opts:
            opt.param_groups[0]["params"][0].grad = grad.clone()
            opt.step()
    assert torch.equal(named[0][1], plain[0])


@pytest.mark.parametrize("projector", ["svd", "randomized", "random"])
def test_a_float64_weight_steps_in_float32_and_keeps_its_precision(projector):
    """float64 weights: the step is computed in float32 (the float32 basis and moments, from the float32 gradient) and
    added to the float64 weight, so each step's change equals a float32 weight's change to within the rounding of a
    float32 weight (its new value, a few u * |p|) per step."""
    generator = torch.Generator().manual_seed(1)
    start = torch.randn(10, 6, generator=generator)
    wide = torch.nn.Parameter(start.double())
    narrow = torch.nn.Parameter(start.clone())
    opts = [GaLorePlusAdamW([{"params": [p], "rank": 2, "projector": projector, "update_proj_gap": 2}], lr=1e-2)
            for p in (wide, narrow)]
    for step in range(1, 5):
        grad = torch.randn(10, 6, generator=generator)
        wide.grad, narrow.grad = grad.double(), grad.clone()
        for opt in opts:
            opt.step()
        assert wide.dtype == torch.float64
        assert opts[0].state[wide]["exp_avg"].dtype == torch.float32
        bound = 4 * step * torch.finfo(torch.float32).eps * float(start.abs().max() + 1)
        assert float((wide - narrow.double()).abs().max()) <= bound


@pytest.mark.parametrize("lr", [torch.tensor(1e-2), torch.tensor([1e-2]), torch.tensor([[1e-2]])])
def test_a_one_element_tensor_lr_of_any_shape_steps_as_the_float(lr):
    results = []
    for value in (lr, 1e-2):
        generator = torch.Generator().manual_seed(2)
        param = torch.nn.Parameter(torch.randn(8, 6, generator=generator))
        opt = GaLorePlusAdamW([{"params": [param], "rank": 2, "full_rank_residual": True}], lr=value)
        for _ in range(3):
            param.grad = torch.randn(8, 6, generator=generator)
            opt.step()
        results.append(param.detach())
    assert torch.equal(*results)


def test_tensor_lr_errors_are_torchs():
    param = torch.nn.Parameter(torch.randn(8, 6))
    for kwargs, words in ((dict(lr=torch.tensor(1e-3), foreach=True), "lr as a Tensor is not supported"),
                          (dict(lr=torch.tensor([1e-3, 1e-3])), "Tensor lr must be 1-element")):
        with pytest.raises(ValueError, match=words):
            GaLorePlusAdamW([{"params": [param], "rank": 2}], **kwargs)
        with pytest.raises(ValueError, match=words):
            torch.optim.AdamW([param], **kwargs)
    with pytest.raises(ValueError, match="param group 1, key 'lr': lr as a Tensor"):
        GaLorePlusAdamW([{"params": [param], "rank": 2}, {"params": [torch.nn.Parameter(torch.randn(3))],
                                                          "lr": torch.tensor(0.1)}], foreach=True)
