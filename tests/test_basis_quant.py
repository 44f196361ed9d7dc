"""4-bit bases: the bitsandbytes round trip against a plain torch NF4 reference, byte counts, captured energy."""

import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("bitsandbytes")

from galore_plus import GaLorePlusAdamW  # noqa: E402
from galore_plus.state.basis_4bit import BLOCKSIZE, dequantize_basis, quantize_basis, quantized_basis_nbytes  # noqa: E402
from galore_plus.projectors.svd import svd_basis  # noqa: E402
from galore_plus.step.projection import project  # noqa: E402

# The 16 NormalFloat4 values as printed in the QLoRA paper (Dettmers et al. 2023, appendix E).
NF4_TABLE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
])


def block_absmax(values: torch.Tensor) -> torch.Tensor:
    """The absmax of each value's block of BLOCKSIZE consecutive values, in ``values``' shape."""
    flat = values.flatten()
    padded = torch.nn.functional.pad(flat.abs(), (0, -flat.numel() % BLOCKSIZE)).view(-1, BLOCKSIZE)
    return padded.amax(dim=1).repeat_interleave(BLOCKSIZE)[: flat.numel()].view(values.shape)


def assert_nearest_nf4_code_times_block_absmax(restored: torch.Tensor, values: torch.Tensor) -> None:
    """Each restored value is an NF4 table entry times its block's absmax, and the nearest such value
    (up to float32 rounding at the midpoint between two entries)."""
    absmax = block_absmax(values)
    candidates = NF4_TABLE * absmax.unsqueeze(-1)
    nearest_error = (candidates - values.unsqueeze(-1)).abs().min(dim=-1).values
    on_table = (candidates - restored.unsqueeze(-1)).abs().min(dim=-1).values
    assert (on_table <= 1e-6 * absmax).all()
    assert ((restored - values).abs() <= nearest_error + 1e-6 * absmax).all()


@settings(max_examples=25, deadline=None, derandomize=True)
@given(m=st.integers(1, 300), n=st.integers(1, 40), scale=st.floats(1e-4, 1e2), seed=st.integers(0, 2**16))
def test_round_trip_gives_the_nearest_nf4_code_times_block_absmax(m, n, scale, seed):
    basis = torch.randn(m, n, generator=torch.Generator().manual_seed(seed)) * scale
    codes, absmax = quantize_basis(basis)
    restored = dequantize_basis(codes, absmax, (m, n))
    assert restored.shape == (m, n) and restored.dtype == torch.float32
    assert codes.numel() == (m * n + 1) // 2
    assert_nearest_nf4_code_times_block_absmax(restored, basis)


@pytest.mark.parametrize("shape", [(64, 32), (3, 32), (1, 2), (4096, 128)])
def test_round_trip_on_shapes_where_bitsandbytes_cpu_dequantize_4bit_is_wrong(shape):
    basis = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    assert_nearest_nf4_code_times_block_absmax(dequantize_basis(*quantize_basis(basis), shape), basis)


@settings(max_examples=15, deadline=None, derandomize=True)
@given(m=st.integers(1, 300), n=st.integers(1, 40))
def test_byte_count_equals_the_stored_tensors(m, n):
    codes, absmax = quantize_basis(torch.randn(m, n))
    assert codes.dtype == torch.uint8 and absmax.dtype == torch.float32
    assert quantized_basis_nbytes(m * n) == codes.nbytes + absmax.nbytes


def test_dequantised_basis_keeps_99_percent_of_the_captured_energy():
    """A rank-16 SVD basis of a 256 x 256 gradient with a decaying spectrum, quantised to 4 bits (loses about 0.008)."""
    generator = torch.Generator().manual_seed(0)
    decay = torch.logspace(0, -2, 64)
    grad = (torch.randn(256, 64, generator=generator) * decay) @ torch.randn(64, 256, generator=generator)
    basis = svd_basis(grad, 16, "right")
    restored = dequantize_basis(*quantize_basis(basis), tuple(basis.shape))
    full = project(grad, basis, "right").square().sum()
    orthonormal = torch.linalg.qr(restored.t())[0].t()
    span_energy = float(project(grad, orthonormal, "right").square().sum() / full)
    assert 0.99 <= span_energy < 1.0


# ---------------------------------------------------------------- basis_bits=4 inside GaLorePlusAdamW


def test_four_bit_steps_use_the_nf4_rounded_basis_and_store_only_codes():
    """GaLore (svd) with basis_bits=4 against a float64 re-implementation whose basis is rounded by the NF4 reference."""
    weight = torch.nn.Parameter(torch.randn(20, 12, generator=torch.Generator().manual_seed(0)))
    start = weight.detach().clone()
    opt = GaLorePlusAdamW([{"params": [weight], "rank": 4, "projector": "svd", "update_proj_gap": 3, "basis_bits": 4}],
                          lr=1e-2, weight_decay=0.0)
    reference = weight.detach().double().clone()
    exp_avg = exp_avg_sq = basis = None
    generator = torch.Generator().manual_seed(1)
    for t in range(1, 6):
        grad = torch.randn(20, 12, generator=generator)
        weight.grad = grad
        opt.step()
        if (t - 1) % 3 == 0:
            basis = nf4_reference(svd_basis(grad, 4, "right")).double()
        low_rank = grad.double() @ basis.t()
        exp_avg = 0.1 * low_rank if exp_avg is None else 0.9 * exp_avg + 0.1 * low_rank
        exp_avg_sq = 0.001 * low_rank**2 if exp_avg_sq is None else 0.999 * exp_avg_sq + 0.001 * low_rank**2
        direction = (exp_avg / (1 - 0.9**t)) / ((exp_avg_sq / (1 - 0.999**t)).sqrt() + 1e-8)
        reference = reference - 1e-2 * 0.25 * direction @ basis
        assert float((reference - weight.detach().double()).abs().max()) < 1e-5, f"step {t}"
    assert float((weight.detach() - start).abs().max()) > 5e-3  # 500x the tolerance
    state = opt.state[weight]
    assert "projector" not in state
    assert state["projector_codes"].dtype == torch.uint8 and state["projector_codes"].numel() == 4 * 12 // 2


def nf4_reference(values: torch.Tensor) -> torch.Tensor:
    """Blockwise NF4 in plain torch: each value becomes the nearest table entry times its block's absmax."""
    absmax = block_absmax(values)
    candidates = NF4_TABLE * absmax.unsqueeze(-1)
    return candidates.gather(-1, (candidates - values.unsqueeze(-1)).abs().argmin(dim=-1, keepdim=True)).squeeze(-1)


def four_bit_model(dtype, optim_bits, basis_bits=4, seed=0):
    torch.manual_seed(seed)
    weights = [torch.nn.Parameter(torch.randn(24, 16, dtype=dtype)), torch.nn.Parameter(torch.randn(32, 24, dtype=dtype))]
    groups = [{"params": weights[:1], "rank": 4, "projector": "randomized", "update_proj_gap": 3, "basis_bits": basis_bits},
              {"params": weights[1:], "rank": 8, "projector": "cross_head", "num_heads": 4, "update_proj_gap": 3,
               "basis_bits": basis_bits}]
    return weights, GaLorePlusAdamW(groups, lr=1e-2, seed=3, optim_bits=optim_bits)


def run(opt, params, stream):
    for grads in stream:
        for param, grad in zip(params, grads):
            param.grad = grad
        opt.step()


def checkpoint_of(params, opt):
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "optimizer": opt.state_dict()}, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def restore(params, opt, checkpoint):
    with torch.no_grad():
        for param, saved in zip(params, checkpoint["params"]):
            param.copy_(saved)
    opt.load_state_dict(checkpoint["optimizer"])


@pytest.mark.parametrize("optim_bits", [32, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_load_weights_only_and_continue_equals_never_stopping(dtype, optim_bits):
    params, opt = four_bit_model(dtype, optim_bits)
    start = [p.detach().clone() for p in params]
    generator = torch.Generator().manual_seed(2)
    stream = [[torch.randn(p.shape, generator=generator).to(dtype) for p in params] for _ in range(8)]
    run(opt, params, stream)
    first_params, first_opt = four_bit_model(dtype, optim_bits)
    run(first_opt, first_params, stream[:5])
    params_b, opt_b = four_bit_model(dtype, optim_bits, seed=99)
    restore(params_b, opt_b, checkpoint_of(first_params, first_opt))
    run(opt_b, params_b, stream[5:])
    for before, never_stopped, resumed in zip(start, params, params_b):
        assert float((never_stopped.detach().float() - before.float()).abs().max()) > 1e-2
        assert torch.equal(never_stopped, resumed)


def test_a_float32_basis_checkpoint_continues_with_4_bit_bases_from_the_next_refresh():
    """A checkpoint cannot change basis_bits (galore_plus.state.checkpoint); setting it on the group after loading takes
    effect at the next refresh, and the float32 basis is dropped then."""
    params, opt = four_bit_model(torch.float32, 32, basis_bits=32)
    generator = torch.Generator().manual_seed(2)
    stream = [[torch.randn(p.shape, generator=generator) for p in params] for _ in range(5)]
    run(opt, params, stream[:2])
    params_b, opt_b = four_bit_model(torch.float32, 32)
    with pytest.raises(ValueError, match="key 'basis_bits': the checkpoint was saved with basis_bits=32"):
        restore(params_b, opt_b, checkpoint_of(params, opt))
    params_b, opt_b = four_bit_model(torch.float32, 32, basis_bits=32)
    restore(params_b, opt_b, checkpoint_of(params, opt))
    opt_b.param_groups[0]["basis_bits"] = 4
    run(opt_b, params_b, stream[2:3])
    assert "projector" in opt_b.state[params_b[0]]  # step 3 still uses the saved float32 basis
    run(opt_b, params_b, stream[3:])
    assert "projector" not in opt_b.state[params_b[0]] and "projector_codes" in opt_b.state[params_b[0]]


@pytest.mark.parametrize("keys, message", [
    ({"basis_bits": 8}, r"must be one of \(32, 4\)"),
    ({"basis_bits": True}, "must be one of"),
    ({"basis_bits": 4, "projector": "random"}, "projector 'random' and update rule 'galore' do not read it"),
])
def test_bad_basis_bits_name_the_group_and_key(keys, message):
    weight = torch.nn.Parameter(torch.randn(8, 8))
    with pytest.raises(ValueError, match=rf"param group 0, key 'basis_bits': {message}"):
        GaLorePlusAdamW([{"params": [weight], "rank": 2, **keys}])
