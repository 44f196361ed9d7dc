"""Expert stacks (E, m, n) and convolution kernels (out, in, kh, kw) in projected groups.

The reference of a stack's step is its experts stepped as separate 2-D weights, each by its own
optimizer seeded with ``expert_seed(seed, e)`` (so it draws what expert e of the stack draws), on
the same gradients; the reference of a convolution kernel's step is the step of the matrix
(out, in kh kw) on the reshaped gradient. Both compute the same float32 arithmetic, batched or
not, so they agree to float32 rounding: a few units of float32's epsilon relative to the weight's
size per step (the batched and the single products may round differently, and Adam's
normalisation passes a relative change through about unchanged).
"""

from __future__ import annotations

import io
import warnings

import pytest
import torch

from galore_plus import GaLorePlusAdamW
from galore_plus.step.stacks import expert_seed
from support import HostReads

EXPERTS, M, N, RANK, STEPS, GAP = 3, 12, 8, 3, 7, 3  # refreshes at steps 1, 4 and 7

LEVERS = {
    "plain": {},
    "fira": {"full_rank_residual": True},
    "fira_auto": {"full_rank_residual": True, "scale": "auto"},
    "auto": {"scale": "auto"},
    "transfer": {"moment_transfer": True},
    "warm": {"warm_start": True},
    "reverse": {"proj_type": "reverse_std"},
    "apollo_channel": {"update_rule": "apollo", "scale_type": "channel", "scale": 1.0},
    "apollo_tensor": {"update_rule": "apollo", "scale_type": "tensor", "scale": 4.0},
}
# Levers the projector reads (the others are refused: 'random' has no stored basis to warm-start or transfer from).
CASES = [(projector, lever) for projector in ("svd", "randomized", "random") for lever in LEVERS
         if not (lever == "warm" and projector != "randomized") and not (lever == "transfer" and projector == "random")]


def gradients(shape: tuple[int, ...], dtype: torch.dtype = torch.float32, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator).to(dtype) for _ in range(STEPS)]


def options(projector: str, lever: str) -> dict:
    return {"rank": RANK, "update_proj_gap": GAP, "projector": projector, "scale": 0.5, **LEVERS[lever]}


def stack_and_experts(group: dict, grads: list[torch.Tensor], seed: int = 5, optim_bits: int = 32,
                      dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(the stack after the steps, the experts stepped as separate 2-D weights, stacked)."""
    start = torch.randn(grads[0].shape, generator=torch.Generator().manual_seed(9)).to(dtype)
    stack = torch.nn.Parameter(start.clone())
    opt = GaLorePlusAdamW([{"params": [stack], **group}], lr=1e-2, weight_decay=0.1, seed=seed, optim_bits=optim_bits)
    experts = [torch.nn.Parameter(start[e].clone()) for e in range(start.shape[0])]
    singles = [GaLorePlusAdamW([{"params": [expert], **group}], lr=1e-2, weight_decay=0.1, seed=expert_seed(seed, e),
                               optim_bits=optim_bits) for e, expert in enumerate(experts)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for grad in grads:
            stack.grad = grad.clone()
            opt.step()
            for e, (expert, single) in enumerate(zip(experts, singles)):
                expert.grad = grad[e].clone()
                single.step()
    return stack.detach(), torch.stack([expert.detach() for expert in experts])


def assert_rounding_close(actual: torch.Tensor, expected: torch.Tensor, moved_from: torch.Tensor | None = None) -> None:
    """Equal up to float32 rounding accumulated over the steps (module docstring): 64 eps of the weight's size."""
    eps = torch.finfo(torch.float32).eps
    scale = expected.float().abs().max()
    torch.testing.assert_close(actual.float(), expected.float(), rtol=0, atol=float(64 * STEPS * eps * scale))


@pytest.mark.parametrize("projector, lever", CASES)
def test_a_stack_steps_as_its_experts_stepped_separately(projector, lever):
    grads = gradients((EXPERTS, M, N))
    stack, experts = stack_and_experts(options(projector, lever), grads)
    assert_rounding_close(stack, experts)
    start = torch.randn((EXPERTS, M, N), generator=torch.Generator().manual_seed(9))
    assert (stack - start).abs().amax((1, 2)).min() > 1e-3  # every expert moved


def test_experts_draw_from_their_own_generators():
    """Equal experts with equal gradients get different random bases; expert e draws the same whatever the stack's size."""
    def stepped(experts: int) -> torch.Tensor:
        weight = torch.nn.Parameter(torch.zeros(experts, M, N))
        opt = GaLorePlusAdamW([{"params": [weight], **options("random", "plain")}], lr=1e-2, seed=5)
        weight.grad = torch.ones(experts, M, N) + torch.arange(float(N))
        opt.step()
        return weight.detach()

    two, three = stepped(2), stepped(3)
    assert (two[0] - two[1]).abs().max() > 1e-4
    assert torch.equal(two, three[:2])


@pytest.mark.parametrize("block_values", [2 * N, 2 * M * N], ids=["two rows of one expert", "two whole experts"])
@pytest.mark.parametrize("projector", ["svd", "randomized"])
def test_a_bfloat16_stack_in_several_blocks(projector, block_values, monkeypatch):
    """Blocks of rows of one expert, or of several whole experts (the last block holding fewer), give the experts'
    steps."""
    import galore_plus.step.row_blocks as row_blocks

    monkeypatch.setattr(row_blocks, "ROW_BLOCK_VALUES", block_values)
    grads = gradients((EXPERTS, M, N), torch.bfloat16)
    for lever in ("plain", "fira", "apollo_channel"):
        stack, experts = stack_and_experts(options(projector, lever), grads, dtype=torch.bfloat16)
        assert torch.equal(stack, experts) or assert_rounding_close(stack, experts) is None


def test_8bit_moments_and_4bit_bases_of_a_stack():
    """Blocks of 256 moment values and 64 basis values align with the experts here (r n = 256, m r = 64), so the
    8-bit and 4-bit stack holds what its experts hold."""
    pytest.importorskip("bitsandbytes")
    shape = (2, 64, 32)  # right side: moments (64, 4) per expert, basis (4, 32)
    grads = gradients(shape)
    group = {"rank": 4, "update_proj_gap": GAP, "projector": "svd", "basis_bits": 4, "scale": 0.5}
    stack, experts = stack_and_experts(group, grads, optim_bits=8)
    assert_rounding_close(stack, experts)


def test_a_non_finite_expert_is_skipped_alone():
    grads = gradients((EXPERTS, M, N))
    grads[2][1, 0, 0] = float("nan")
    stack, experts = stack_and_experts(options("svd", "fira"), grads)
    assert torch.isfinite(stack).all()
    assert_rounding_close(stack, experts)
    weight = torch.nn.Parameter(torch.randn(EXPERTS, M, N))
    opt = GaLorePlusAdamW([{"params": [weight], **options("svd", "plain")}], lr=1e-2)
    for t, grad in enumerate(grads[:4]):
        weight.grad = grad
        before = weight.detach().clone()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.step()
        unchanged = [torch.equal(weight[e], before[e]) for e in range(EXPERTS)]
        assert unchanged == [False, t == 2, False]


@pytest.mark.parametrize("projector, lever", [("svd", "plain"), ("randomized", "fira"), ("random", "apollo_channel"),
                                              ("svd", "transfer"), ("randomized", "residual"), ("svd", "adaptive")])
def test_a_convolution_kernel_steps_as_its_reshaped_matrix(projector, lever):
    grads = gradients((6, 2, 3, 3))
    start = torch.randn(6, 2, 3, 3, generator=torch.Generator().manual_seed(9))
    kernel, matrix = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.reshape(6, 18).clone())
    matrix_only = {"residual": {"residual_ratio": 0.1, "residual_warmup": 1},
                   "adaptive": {"adaptive_gap": True, "gap_patience": 1, "gap_overlap_threshold": 0.2}}
    group = dict(options(projector, "plain"), **matrix_only[lever]) if lever in matrix_only else options(projector, lever)
    opts = [GaLorePlusAdamW([{"params": [p], **group}], lr=1e-2, weight_decay=0.1, seed=3) for p in (kernel, matrix)]
    for grad in grads:
        kernel.grad, matrix.grad = grad.clone(), grad.reshape(6, 18).clone()
        for opt in opts:
            opt.step()
    assert torch.equal(kernel.detach().reshape(6, 18), matrix.detach())
    assert (kernel.detach() - start).abs().max() > 1e-3


def test_a_channels_last_kernel_is_refused_at_its_step():
    kernel = torch.nn.Parameter(torch.randn(6, 2, 3, 3).to(memory_format=torch.channels_last))
    opt = GaLorePlusAdamW([{"params": [kernel], "rank": 2, "name": "conv"}])
    kernel.grad = torch.randn_like(kernel)
    with pytest.raises(TypeError, match=r"param group 0 \('conv'\), key 'rank': the convolution kernel .* not contiguous"):
        opt.step()


@pytest.mark.parametrize("keys, key", [
    ({"projector": "cross_head", "num_heads": 2}, "projector"),
    ({"residual_ratio": 0.1}, "residual_ratio"),
    ({"adaptive_gap": True}, "adaptive_gap"),
])
def test_what_stacks_do_not_implement_is_refused_naming_group_and_key(keys, key):
    with pytest.raises(ValueError, match=rf"param group 0 \('experts'\), key '{key}': parameter 0 of shape \(3, 12, 8\) "
                                         "is a stack of matrices"):
        GaLorePlusAdamW([{"params": [torch.nn.Parameter(torch.zeros(3, 12, 8))], "rank": 2, "name": "experts", **keys}])


def test_an_empty_stack_is_refused():
    with pytest.raises(ValueError, match=r"param group 0, key 'rank': parameter 0 of shape \(0, 12, 8\) is a stack of "
                                         "no expert matrices"):
        GaLorePlusAdamW([{"params": [torch.nn.Parameter(torch.zeros(0, 12, 8))], "rank": 2}])


def test_a_transposed_kernel_is_refused():
    with pytest.raises(ValueError, match=r"param group 0, key 'transposed': parameter 0 of shape \(6, 2, 3, 3\)"):
        GaLorePlusAdamW([{"params": [torch.nn.Parameter(torch.zeros(6, 2, 3, 3))], "rank": 2, "transposed": True}])


def test_a_transposed_stack_steps_as_its_transposed_experts():
    grads = gradients((EXPERTS, N, M))
    group = dict(options("randomized", "fira"), transposed=True)
    stack, experts = stack_and_experts(group, grads)
    assert_rounding_close(stack, experts)


@pytest.mark.parametrize("optim_bits", [32, 8])
def test_resume_of_a_stack_is_bit_exact(optim_bits):
    if optim_bits == 8:
        pytest.importorskip("bitsandbytes")
    grads = gradients((EXPERTS, 32, 16))
    group = {"rank": 4, "update_proj_gap": 2, "projector": "randomized", "full_rank_residual": True}

    def make(start):
        weight = torch.nn.Parameter(start.clone())
        return weight, GaLorePlusAdamW([{"params": [weight], **group}], lr=1e-2, optim_bits=optim_bits)

    start = torch.randn(EXPERTS, 32, 16)
    weight, opt = make(start)
    for t, grad in enumerate(grads):
        if t == 3:
            buffer = io.BytesIO()
            torch.save({"weight": weight.detach(), "optimizer": opt.state_dict()}, buffer)
        weight.grad = grad
        opt.step()
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed, resumed_opt = make(saved["weight"])
    resumed_opt.load_state_dict(saved["optimizer"])
    for grad in grads[3:]:
        resumed.grad = grad
        resumed_opt.step()
    assert torch.equal(resumed, weight) and not torch.equal(weight, start)


def test_a_stack_with_a_wrong_checkpoint_shape_is_refused():
    weight = torch.nn.Parameter(torch.randn(EXPERTS, M, N))
    opt = GaLorePlusAdamW([{"params": [weight], "rank": 2}])
    weight.grad = torch.randn_like(weight)
    opt.step()
    other = torch.nn.Parameter(torch.randn(EXPERTS + 1, M, N))
    other_opt = GaLorePlusAdamW([{"params": [other], "rank": 2}])
    with pytest.raises(ValueError, match=r"state key 'projector': the checkpoint's tensor has shape \(3, 2, 8\), this "
                                         r"optimizer expects \(4, 2, 8\)"):
        other_opt.load_state_dict(opt.state_dict())


@pytest.mark.parametrize("bits", [32, 8])
@pytest.mark.parametrize("projector, rule", [("svd", "galore"), ("randomized", "galore"), ("random", "apollo")])
def test_a_stacks_steps_without_a_refresh_read_nothing_on_the_host(projector, rule, bits):
    if bits == 8:
        pytest.importorskip("bitsandbytes")
    stack = torch.nn.Parameter(torch.randn(EXPERTS, M, N, dtype=torch.bfloat16))
    group = {"params": [stack], "rank": RANK, "update_proj_gap": 3, "projector": projector, "update_rule": rule,
             "full_rank_residual": rule == "galore"}
    opt = GaLorePlusAdamW([group], lr=1e-2, optim_bits=bits)
    reads = {}
    for t in range(1, 7):
        stack.grad = torch.randn(EXPERTS, M, N, dtype=torch.bfloat16)
        with warnings.catch_warnings(), HostReads() as recorder:
            warnings.simplefilter("ignore")
            opt.step()
        reads[t] = recorder.calls
    refreshes = (1, 4) if projector != "random" else ()
    assert {t: calls for t, calls in reads.items() if t not in refreshes} == {t: [] for t in range(1, 7)
                                                                                 if t not in refreshes}


def test_8bit_codes_of_a_skipped_expert_are_kept_where_blocks_align():
    """A skipped expert's moments are re-quantised from their dequantised values, which gives the same codes."""
    pytest.importorskip("bitsandbytes")
    stack = torch.nn.Parameter(torch.randn(2, 64, 32))
    opt = GaLorePlusAdamW([{"params": [stack], "rank": 4, "projector": "svd"}], lr=1e-2, optim_bits=8)
    for t in range(4):
        stack.grad = torch.randn(2, 64, 32)
        if t == 3:
            stack.grad[1, 5, 5] = float("inf")
            before = {key: value.clone() for key, value in opt.state[stack].items() if isinstance(value, torch.Tensor)}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.step()
    state = opt.state[stack]
    for key in ("exp_avg", "exp_avg_sq"):
        codes, absmax = state[f"{key}_codes"], state[f"{key}_absmax"]  # one block of 256 values per expert
        assert torch.equal(codes[1], before[f"{key}_codes"][1]) and torch.equal(absmax[1], before[f"{key}_absmax"][1])
        assert not torch.equal(codes[0], before[f"{key}_codes"][0])
