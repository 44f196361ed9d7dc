"""4-bit bases: the bitsandbytes round trip against a plain torch NF4 reference, byte counts, captured energy."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("bitsandbytes")

from galore_plus.basis_quant import BLOCKSIZE, dequantize_basis, quantize_basis, quantized_basis_nbytes  # noqa: E402
from galore_plus.projectors import project, svd_basis  # noqa: E402

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
