"""Projector strategies: orthonormality, subspace quality, cross-head choice, seeding."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from galore_plus.group_options import projected_group_defaults
from galore_plus.projectors import PROJECTORS, projection_side
from galore_plus.projectors.cross_head import chosen_heads, head_rows
from galore_plus.projectors.generators import basis_generator
from galore_plus.projectors.random import random_orthonormal_basis
from galore_plus.projectors.randomized import randomized_basis
from galore_plus.projectors.svd import svd_basis
from galore_plus.step.projection import project, project_back


def cross_head_basis(grad, rank, num_heads, generator, head_projector="svd"):
    """The ``cross_head`` projector's basis of a whole gradient, through the registry as the optimizer gets it."""
    group = {**projected_group_defaults(), "rank": rank, "num_heads": num_heads, "head_projector": head_projector}
    projector, shape = PROJECTORS["cross_head"], tuple(grad.shape)
    rows = projector.rows(group, shape, generator)
    return projector.basis(grad.index_select(0, rows), shape, group, "right", generator, None)


def captured_energy(grad: torch.Tensor, basis: torch.Tensor, side: str) -> float:
    """Fraction of ||G||_F^2 kept by projecting onto the basis."""
    return float(project(grad, basis, side).square().sum() / grad.square().sum())


@settings(max_examples=30, deadline=None, derandomize=True)
@given(m=st.integers(1, 40), n=st.integers(1, 40), rank=st.integers(1, 6), side=st.sampled_from(["left", "right"]),
       dtype=st.sampled_from([torch.bfloat16, torch.float16]), block_values=st.sampled_from([None, 1, 37, 200]),
       seed=st.integers(0, 2**16))
def test_half_precision_gradient_is_projected_in_widened_row_blocks(m, n, rank, side, dtype, block_values, seed):
    """P^T G | G Q^T of a bfloat16/float16 gradient, taken a block of rows at a time, equals the float64
    product of the same values within float32 rounding of the terms (an entry is about sqrt(m or n))."""
    generator = torch.Generator().manual_seed(seed)
    grad = torch.randn(m, n, generator=generator).to(dtype)
    basis = torch.randn((m, rank) if side == "left" else (rank, n), generator=generator)
    low_rank = project(grad, basis, side, block_values)
    exact = basis.double().t() @ grad.double() if side == "left" else grad.double() @ basis.double().t()
    terms = basis.double().abs().t() @ grad.double().abs() if side == "left" else grad.double().abs() @ basis.double().abs().t()
    assert low_rank.dtype == torch.float32 and low_rank.shape == exact.shape and low_rank.is_contiguous()
    assert ((low_rank.double() - exact).abs() <= 1e-6 * terms + 1e-30).all()


def assert_orthonormal(basis: torch.Tensor, side: str) -> None:
    gram = basis.t() @ basis if side == "left" else basis @ basis.t()
    torch.testing.assert_close(gram, torch.eye(gram.shape[0]), atol=1e-4, rtol=0)


def low_rank_plus_noise(m: int, n: int, true_rank: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    decay = torch.logspace(0, -2, true_rank)
    left = torch.randn(m, true_rank, generator=generator)
    right = torch.randn(true_rank, n, generator=generator)
    return (left * decay) @ right + 0.01 * torch.randn(m, n, generator=generator)


@pytest.mark.parametrize(
    "shape, proj_type, expected",
    [
        ((8, 4), "std", "right"), ((4, 8), "std", "left"), ((4, 4), "std", "right"),
        ((8, 4), "reverse_std", "left"), ((4, 8), "reverse_std", "right"),
        ((8, 4), "left", "left"), ((4, 8), "right", "right"),
    ],
)
def test_projection_side_follows_galore_proj_type(shape, proj_type, expected):
    assert projection_side(shape, proj_type, "svd") == expected


def test_cross_head_always_projects_the_input_side():
    assert projection_side((4, 8), "std", "cross_head") == "right"
    assert projection_side((8, 4), "left", "cross_head") == "right"


@settings(max_examples=15, deadline=None, derandomize=True)
@given(m=st.integers(2, 40), n=st.integers(2, 40), data=st.data(), side=st.sampled_from(["left", "right"]))
def test_every_projector_returns_an_orthonormal_basis_of_the_documented_shape(m, n, data, side):
    rank = data.draw(st.integers(1, min(m, n)))
    grad = torch.randn(m, n, generator=torch.Generator().manual_seed(m * 100 + n))
    expected = (m, rank) if side == "left" else (rank, n)
    for basis in (
        svd_basis(grad, rank, side),
        randomized_basis(grad, rank, side, basis_generator(0, 0, 0, grad.device)),
        random_orthonormal_basis((m, n), rank, side, basis_generator(0, 0, 0, grad.device), grad.device),
    ):
        assert basis.shape == expected
        assert_orthonormal(basis, side)


def test_project_back_of_project_is_the_orthogonal_projection():
    grad = torch.randn(12, 9)
    for side in ("left", "right"):
        basis = svd_basis(grad, 9, side)
        torch.testing.assert_close(project_back(project(grad, basis, side), basis, side), grad, atol=1e-5, rtol=0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_randomized_matches_svd_energy_on_decaying_spectrum(side):
    grad = low_rank_plus_noise(200, 150, 60, seed=1)
    exact = captured_energy(grad, svd_basis(grad, 16, side), side)
    fast = captured_energy(grad, randomized_basis(grad, 16, side, basis_generator(0, 0, 0, grad.device)), side)
    assert fast <= exact + 1e-5
    assert (exact - fast) / exact < 0.01


def test_randomized_warm_start_from_the_exact_basis_stays_exact():
    grad = low_rank_plus_noise(120, 90, 40, seed=2)
    exact = svd_basis(grad, 10, "left")
    warm = randomized_basis(grad, 10, "left", basis_generator(0, 0, 0, grad.device), power_iters=1, previous=exact)
    torch.testing.assert_close(warm @ warm.t(), exact @ exact.t(), atol=1e-3, rtol=0)


def test_randomized_is_a_pure_function_of_its_generator_seed():
    grad = torch.randn(50, 40)
    first = randomized_basis(grad, 5, "right", basis_generator(3, 1, 2, grad.device))
    again = randomized_basis(grad, 5, "right", basis_generator(3, 1, 2, grad.device))
    other = randomized_basis(grad, 5, "right", basis_generator(3, 1, 3, grad.device))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_basis_generator_differs_by_seed_position_and_refresh():
    draws = {
        key: torch.randn(4, generator=basis_generator(*key, torch.device("cpu"))).tolist()
        for key in [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1)]
    }
    assert len({tuple(v) for v in draws.values()}) == 4


@pytest.mark.parametrize("num_heads, head_dim, rank", [(8, 16, 16), (8, 16, 24), (4, 16, 64), (2, 32, 8)])
def test_cross_head_uses_ceil_rank_over_head_dim_distinct_heads(num_heads, head_dim, rank):
    generator = torch.Generator().manual_seed(5)
    heads = chosen_heads(num_heads, math.ceil(rank / head_dim), generator)
    assert len(set(heads.tolist())) == math.ceil(rank / head_dim)
    grad = torch.randn(num_heads * head_dim, 64)
    basis = cross_head_basis(grad, rank, num_heads, basis_generator(0, 0, 0, grad.device))
    assert basis.shape == (rank, 64)
    assert_orthonormal(basis, "right")


def test_cross_head_basis_is_the_svd_of_the_chosen_heads_rows():
    num_heads, head_dim, n, rank = 6, 8, 40, 8
    grad = torch.randn(num_heads * head_dim, n)
    generator = basis_generator(0, 4, 1, grad.device)
    basis = cross_head_basis(grad, rank, num_heads, generator)
    heads = chosen_heads(num_heads, 1, torch.Generator().manual_seed(generator.initial_seed()))
    rows = grad[heads.item() * head_dim:(heads.item() + 1) * head_dim]
    torch.testing.assert_close(basis.t() @ basis, svd_basis(rows, rank, "right").t() @ svd_basis(rows, rank, "right"))
    assert torch.equal(head_rows(grad, num_heads, heads), rows)


def test_cross_head_on_grouped_query_key_shape():
    # TinyLlama-like k_proj: 4 key/value heads of dimension 16 over a hidden size of 128.
    grad = torch.randn(4 * 16, 128)
    for head_projector in ("svd", "randomized"):
        basis = cross_head_basis(grad, 24, 4, basis_generator(0, 0, 0, grad.device), head_projector)
        assert basis.shape == (24, 128)
        assert_orthonormal(basis, "right")


def test_cross_head_captures_shared_head_structure():
    # Heads that share an input subspace (the paper's hypothesis): one head's basis serves all.
    generator = torch.Generator().manual_seed(0)
    shared = torch.linalg.qr(torch.randn(96, 8, generator=generator))[0].t()
    grad = torch.randn(8 * 16, 8, generator=generator) @ shared + 1e-3 * torch.randn(128, 96, generator=generator)
    basis = cross_head_basis(grad, 8, 8, basis_generator(0, 0, 0, grad.device))
    assert captured_energy(grad, basis, "right") > 0.99


def real_gradients() -> dict[str, torch.Tensor]:
    """Weight gradients of a small LLaMA after a few steps on real text (the standard library's source)."""
    transformers = pytest.importorskip("transformers")
    import inspect

    text = inspect.getsource(inspect).encode()[:8192]
    tokens = torch.tensor(list(text)).view(8, -1)[:, :128]
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=344, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256,
    )
    model = transformers.LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(3):
        optimizer.zero_grad()
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.dim() == 2 and "proj" in name}


@pytest.fixture(scope="module")
def gradients():
    return real_gradients()


def test_randomized_keeps_energy_within_one_percent_of_svd_on_real_gradients(gradients):
    for name, grad in gradients.items():
        side = projection_side(tuple(grad.shape), "std", "randomized")
        rank = min(grad.shape) // 4
        exact = captured_energy(grad, svd_basis(grad, rank, side), side)
        fast = captured_energy(grad, randomized_basis(grad, rank, side, basis_generator(0, 0, 0, grad.device)), side)
        assert (exact - fast) / exact < 0.01, name


def test_cross_head_beats_a_random_basis_on_real_query_and_key_gradients(gradients):
    for name, grad in gradients.items():
        if "q_proj" not in name and "k_proj" not in name:
            continue
        num_heads = grad.shape[0] // 16
        basis = cross_head_basis(grad, 16, num_heads, basis_generator(0, 0, 0, grad.device))
        random = random_orthonormal_basis(tuple(grad.shape), 16, "right", basis_generator(1, 0, 0, grad.device), grad.device)
        assert_orthonormal(basis, "right")
        assert captured_energy(grad, basis, "right") > 1.5 * captured_energy(grad, random, "right"), name
