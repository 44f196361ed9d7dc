"""8-bit moments: blockwise quantisation bounds, the 8-bit steps against float32 references, resume, bad input."""

import io
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("bitsandbytes")

from galore_plus import GaLorePlusAdamW  # noqa: E402
from galore_plus.state import adamw_8bit  # noqa: E402
from galore_plus.state.adamw_8bit import adamw_step_8bit, init_adamw_state_8bit  # noqa: E402
from galore_plus.state.moments_8bit import BLOCKSIZE, dequantize, dynamic_map, quantize  # noqa: E402


def quantisation_step(signed: bool) -> float:
    """Largest error of one value relative to its block's absmax: a value is coded by one of the two
    map entries around it, so by at most the widest gap of the map (or the distance from -1 to its end)."""
    code = dynamic_map(signed, torch.device("cpu")).sort().values
    return max(float(code.diff().max()), 1.0 + float(code.min()) if signed else 0.0)


def blockwise_bound(values: torch.Tensor, signed: bool) -> torch.Tensor:
    """Per-value bound: quantisation_step * absmax of the value's block (plus float32 rounding)."""
    flat = values.flatten()
    padded = torch.nn.functional.pad(flat.abs(), (0, -flat.numel() % BLOCKSIZE))
    absmax = padded.view(-1, BLOCKSIZE).max(1).values.repeat_interleave(BLOCKSIZE)[: flat.numel()]
    return (absmax * (quantisation_step(signed) * (1 + 1e-5))).view(values.shape)


def dequantized(state: dict, key: str) -> torch.Tensor:
    return dequantize(state[f"{key}_codes"], state[f"{key}_absmax"], key == "exp_avg")


@settings(max_examples=20, deadline=None, derandomize=True)
@given(numel=st.integers(1, 3000), scale=st.floats(1e-6, 1e3), signed=st.booleans(), seed=st.integers(0, 2**16))
def test_round_trip_error_is_within_one_quantisation_step_of_the_block_absmax(numel, scale, signed, seed):
    values = torch.randn(numel, generator=torch.Generator().manual_seed(seed)) * scale
    if not signed:
        values = values.square()
    codes, absmax = quantize(values, signed)
    assert codes.dtype == torch.uint8 and codes.shape == values.shape
    assert absmax.dtype == torch.float32 and absmax.numel() == -(-numel // BLOCKSIZE)
    assert ((dequantize(codes, absmax, signed) - values).abs() <= blockwise_bound(values, signed)).all()


def projected_optimizer(weight: torch.Tensor, bits: int, rank: int, proj_type: str, **options) -> GaLorePlusAdamW:
    group = {"params": [weight], "rank": rank, "projector": "svd", "proj_type": proj_type, **options}
    return GaLorePlusAdamW([group], lr=1e-2, weight_decay=0.1, optim_bits=bits)


@settings(max_examples=12, deadline=None, derandomize=True)
@given(m=st.integers(8, 48), n=st.integers(8, 48), rank_fraction=st.floats(0.1, 1.0),
       proj_type=st.sampled_from(["left", "right"]), seed=st.integers(0, 2**16))
def test_projected_8bit_step_equals_float32_step_on_the_dequantised_moments(m, n, rank_fraction, proj_type, seed):
    generator = torch.Generator().manual_seed(seed)
    rank = max(1, int(rank_fraction * min(m, n)))
    weight8 = torch.nn.Parameter(torch.randn(m, n, generator=generator))
    opt8 = projected_optimizer(weight8, 8, rank, proj_type)
    weight8.grad = torch.randn(m, n, generator=generator)
    opt8.step()

    state8 = opt8.state[weight8]
    moments = {key: dequantized(state8, key) for key in ("exp_avg", "exp_avg_sq")}
    weight32 = torch.nn.Parameter(weight8.detach().clone())
    opt32 = projected_optimizer(weight32, 32, rank, proj_type)
    opt32.state[weight32].update(projector=state8["projector"].clone(), step=state8["step"],
                                 **{key: value.clone() for key, value in moments.items()})
    grad = torch.randn(m, n, generator=generator)
    weight8.grad, weight32.grad = grad.clone(), grad.clone()
    opt8.step()
    opt32.step()

    torch.testing.assert_close(weight8.detach(), weight32.detach(), rtol=1e-5, atol=1e-6)
    for key in ("exp_avg", "exp_avg_sq"):
        reference = opt32.state[weight32][key]
        error = (dequantized(opt8.state[weight8], key) - reference).abs()
        assert (error <= blockwise_bound(reference, key == "exp_avg")).all()


def test_first_8bit_step_equals_first_32bit_step():
    """Moments start at zero and are quantised only after the update: step 1 is the float32 step."""
    weights = [torch.nn.Parameter(torch.randn(32, 40, generator=torch.Generator().manual_seed(3))) for _ in range(2)]
    grad = torch.randn(32, 40, generator=torch.Generator().manual_seed(4))
    for weight, bits in zip(weights, (32, 8)):
        weight.grad = grad.clone()
        projected_optimizer(weight, bits, 8, "std").step()
    assert torch.equal(weights[0], weights[1])


def test_8bit_training_stays_close_to_32bit_training_with_a_residual():
    generator = torch.Generator().manual_seed(5)
    start = torch.randn(64, 64, generator=generator)
    grads = [torch.randn(64, 64, generator=generator) for _ in range(12)]
    finals = []
    for bits in (32, 8):
        weight = torch.nn.Parameter(start.clone())
        opt = projected_optimizer(weight, bits, 16, "std", residual_ratio=0.02, residual_warmup=2)
        for grad in grads:
            weight.grad = grad.clone()
            opt.step()
        finals.append(weight.detach())
    moved = (finals[0] - start).norm()
    assert (finals[1] - finals[0]).norm() <= 0.05 * moved


@settings(max_examples=8, deadline=None, derandomize=True)
@given(shape=st.sampled_from([(4096,), (80, 64), (5000,), (3, 77, 31)]), seed=st.integers(0, 2**16),
       chunk_values=st.sampled_from([None, BLOCKSIZE, 3 * BLOCKSIZE]))
def test_plain_8bit_adamw_matches_torch_adamw_on_the_dequantised_moments(shape, seed, chunk_values):
    """Also with the CPU step cut into chunks of 1 or 3 blocks (``None``: the default, one chunk at these sizes)."""
    with pytest.MonkeyPatch.context() as patch:
        if chunk_values is not None:
            patch.setattr(adamw_8bit, "CHUNK_VALUES", chunk_values)
        plain_8bit_adamw_matches_torch_adamw(shape, seed)


def plain_8bit_adamw_matches_torch_adamw(shape: tuple[int, ...], seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    big = torch.nn.Parameter(torch.randn(shape, generator=generator))
    small = torch.nn.Parameter(torch.randn(30, generator=generator))
    reference = [torch.nn.Parameter(p.detach().clone()) for p in (big, small)]
    opt8 = GaLorePlusAdamW([big, small], lr=1e-2, weight_decay=0.1, optim_bits=8)
    torch_opt = torch.optim.AdamW(reference, lr=1e-2, weight_decay=0.1)
    for step in range(3):
        grads = [torch.randn(p.shape, generator=generator) for p in (big, small)]
        if step > 0:
            torch_state = torch_opt.state[reference[0]]
            for key in ("exp_avg", "exp_avg_sq"):
                torch_state[key].copy_(dequantized(opt8.state[big], key))
        for param, ref, grad in zip((big, small), reference, grads):
            param.grad, ref.grad = grad.clone(), grad.clone()
        opt8.step()
        torch_opt.step()
        torch.testing.assert_close(big.detach(), reference[0].detach(), rtol=1e-5, atol=1e-6)
        assert torch.equal(small.detach(), reference[1].detach())
    assert opt8.state[big]["exp_avg_codes"].dtype == torch.uint8
    assert opt8.state[small]["exp_avg"].dtype == torch.float32


def bitsandbytes_whole_step(param, grad, state, lr, beta1, beta2, eps, weight_decay) -> None:
    """bitsandbytes' 8-bit blockwise AdamW update called once on the whole tensors (the unchunked step)."""
    import bitsandbytes.functional as bnb_functional

    state["step"] += 1
    bnb_functional.optimizer_update_8bit_blockwise(
        "adam", grad, param, state["exp_avg_codes"], state["exp_avg_sq_codes"], beta1, beta2, 0.0, 0.0, eps,
        int(state["step"]), lr, dynamic_map(True, param.device), dynamic_map(False, param.device),
        state["exp_avg_absmax"], state["exp_avg_sq_absmax"], weight_decay=weight_decay)


@settings(max_examples=12, deadline=None, derandomize=True)
@given(shape=st.sampled_from([(4096,), (37, 300), (5000,), (3, 77, 31), (64, 256)]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), blocks=st.integers(1, 9),
       seed=st.integers(0, 2**16))
def test_chunked_8bit_adamw_step_is_bit_identical_to_one_whole_call(shape, dtype, blocks, seed):
    """Chunks of whole blocks (the last one partial where the size is not a multiple of 256) give the
    same weights, codes and absmax values bit for bit as bitsandbytes' update on the whole tensor."""
    generator = torch.Generator().manual_seed(seed)
    start = torch.randn(shape, generator=generator).to(dtype)
    params = [start.clone(), start.clone()]
    states = [{}, {}]
    for param, state in zip(params, states):
        init_adamw_state_8bit(state, param)
    for _ in range(3):
        grad = torch.randn(shape, generator=generator).to(dtype)
        adamw_step_8bit(params[0], grad, states[0], 1e-2, 0.9, 0.999, 1e-8, 0.1, chunk_values=blocks * BLOCKSIZE)
        bitsandbytes_whole_step(params[1], grad, states[1], 1e-2, 0.9, 0.999, 1e-8, 0.1)
    assert not torch.equal(params[0], start)
    assert torch.equal(params[0], params[1])
    for key in ("exp_avg_codes", "exp_avg_sq_codes", "exp_avg_absmax", "exp_avg_sq_absmax", "step"):
        assert torch.equal(states[0][key], states[1][key]), key


@pytest.mark.parametrize("chunk_values", [0, 100, -BLOCKSIZE])
def test_chunk_size_that_is_not_a_positive_number_of_blocks_is_rejected(chunk_values):
    param, state = torch.zeros(4096), {}
    init_adamw_state_8bit(state, param)
    with pytest.raises(ValueError, match="chunk_values must be a positive multiple of 256"):
        adamw_step_8bit(param, torch.ones(4096), state, 1e-2, 0.9, 0.999, 1e-8, 0.0, chunk_values=chunk_values)


def make_model_and_optimizer(seed: int) -> tuple[list[torch.nn.Parameter], GaLorePlusAdamW]:
    generator = torch.Generator().manual_seed(seed)
    projected = torch.nn.Parameter(torch.randn(48, 64, generator=generator))
    plain_bf16 = torch.nn.Parameter(torch.randn(4096, generator=generator).bfloat16())
    small = torch.nn.Parameter(torch.randn(7, generator=generator))
    opt = GaLorePlusAdamW(
        [{"params": [projected], "rank": 8, "update_proj_gap": 3, "projector": "randomized",
          "residual_ratio": 0.01, "residual_warmup": 2}, {"params": [plain_bf16, small]}],
        lr=1e-2, optim_bits=8,
    )
    return [projected, plain_bf16, small], opt


def run_steps(params, opt, grads) -> None:
    for step_grads in grads:
        for param, grad in zip(params, step_grads):
            param.grad = grad.to(param.dtype)
        opt.step()


def test_8bit_state_dict_loads_with_weights_only_and_resumes_exactly():
    generator = torch.Generator().manual_seed(7)
    params, opt = make_model_and_optimizer(0)
    grads = [[torch.randn(p.shape, generator=generator) for p in params] for _ in range(8)]
    run_steps(params, opt, grads[:4])
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "opt": opt.state_dict()}, buffer)
    run_steps(params, opt, grads[4:])

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed, opt2 = make_model_and_optimizer(1)
    with torch.no_grad():
        for param, value in zip(resumed, saved["params"]):
            param.copy_(value)
    opt2.load_state_dict(saved["opt"])
    assert opt2.state[resumed[1]]["exp_avg_absmax"].dtype == torch.float32
    run_steps(resumed, opt2, grads[4:])
    for param, value in zip(resumed, saved["params"]):  # a no-op optimizer would leave the saved values
        assert (param.detach().float() - value.float()).abs().mean() > 1e-2 * 0.25 / 50  # lr * default scale / 50
    for original, again in zip(params, resumed):
        assert torch.equal(original, again)


@pytest.mark.parametrize("bits", [16, 4, 0, True, "8", None])
def test_optim_bits_other_than_32_or_8_is_rejected(bits):
    with pytest.raises(ValueError, match="optim_bits"):
        GaLorePlusAdamW([torch.nn.Parameter(torch.zeros(2))], optim_bits=bits)


def test_8bit_without_bitsandbytes_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
    with pytest.raises(ImportError, match="pip install bitsandbytes"):
        GaLorePlusAdamW([torch.nn.Parameter(torch.zeros(2))], optim_bits=8)


@pytest.mark.parametrize("saved_bits, loading_bits", [(32, 8), (8, 32)])
@pytest.mark.parametrize("projected", [True, False])
def test_checkpoint_of_the_other_bit_width_is_rejected_at_load(saved_bits, loading_bits, projected):
    weight = torch.nn.Parameter(torch.randn(80, 64))

    def make(bits):
        if projected:
            return projected_optimizer(weight, bits, 4, "std")
        return GaLorePlusAdamW([weight], optim_bits=bits)

    saved = make(saved_bits)
    weight.grad = torch.randn(80, 64)
    saved.step()
    with pytest.raises(ValueError, match=rf"param group 0, parameter 0 of shape \(80, 64\): .*optim_bits={saved_bits}"):
        make(loading_bits).load_state_dict(saved.state_dict())
