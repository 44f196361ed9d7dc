"""The ``random`` projector's Gaussian basis: APOLLO's convention, determinism from the generator, JL scaling."""

import pytest
import torch

from galore_plus import GaLorePlusAdamW
from galore_plus.projectors.generators import basis_generator
from galore_plus.step.projection import project
from galore_plus.projectors.random import gaussian_basis


@pytest.mark.parametrize("shape, side", [((24, 10), "right"), ((10, 24), "left")])
def test_equals_apollo_torchs_basis_for_the_same_seed(shape, side):
    random_projector = pytest.importorskip("apollo_torch.random_projector")
    projector = random_projector.GradientProjector(rank=3, update_proj_gap=5, proj_type="std", seed=7)
    projector.project(torch.randn(shape), 0)
    ours = gaussian_basis(shape, 3, side, torch.Generator().manual_seed(7))
    assert torch.equal(ours, projector.ortho_matrix)


def test_same_generator_arguments_give_the_same_basis_and_a_new_refresh_a_new_one():
    first = gaussian_basis((30, 20), 4, "right", basis_generator(5, 2, 3, torch.device("cpu")))
    again = gaussian_basis((30, 20), 4, "right", basis_generator(5, 2, 3, torch.device("cpu")))
    refreshed = gaussian_basis((30, 20), 4, "right", basis_generator(5, 2, 4, torch.device("cpu")))
    other_weight = gaussian_basis((30, 20), 4, "right", basis_generator(5, 3, 3, torch.device("cpu")))
    assert first.shape == (4, 20)
    assert torch.equal(first, again)
    assert not torch.allclose(first, refreshed, atol=0.1)
    assert not torch.allclose(first, other_weight, atol=0.1)


@pytest.mark.parametrize("side", ["left", "right"])
def test_projection_keeps_the_squared_norm_in_expectation(side):
    """E ||P^T G||^2 = E ||G Q^T||^2 = ||G||^2 (N(0, 1/r) entries); 400 draws at r = 4 have a standard error of 0.035."""
    grad = torch.randn(12, 16, generator=torch.Generator().manual_seed(0))
    ratios = torch.tensor([
        float(project(grad, gaussian_basis((12, 16), 4, side, basis_generator(0, 0, k, grad.device)), side).square().sum())
        for k in range(400)
    ]) / grad.square().sum()
    assert abs(float(ratios.mean()) - 1.0) < 0.15


# ---------------------------------------------------------------- inside GaLorePlusAdamW


def test_optimizer_regenerates_the_basis_from_seed_position_and_refresh_count_and_stores_none():
    """GaLore's rule with the random basis, against a float64 re-implementation, over two refreshes."""
    bias = torch.nn.Parameter(torch.randn(6))
    weight = torch.nn.Parameter(torch.randn(12, 20, generator=torch.Generator().manual_seed(0)))
    opt = GaLorePlusAdamW([{"params": [bias]}, {"params": [weight], "rank": 3, "projector": "random", "update_proj_gap": 2}],
                          lr=1e-2, weight_decay=0.1, seed=5)
    reference = weight.detach().double().clone()
    exp_avg = exp_avg_sq = None
    generator = torch.Generator().manual_seed(1)
    for t in range(1, 6):
        grad = torch.randn(12, 20, generator=generator)
        weight.grad, bias.grad = grad, torch.zeros(6)
        opt.step()
        basis = gaussian_basis((12, 20), 3, "left", basis_generator(5, 1, (t - 1) // 2, grad.device)).double()
        low_rank = basis.t() @ grad.double()
        exp_avg = 0.1 * low_rank if exp_avg is None else 0.9 * exp_avg + 0.1 * low_rank
        exp_avg_sq = 0.001 * low_rank**2 if exp_avg_sq is None else 0.999 * exp_avg_sq + 0.001 * low_rank**2
        direction = (exp_avg / (1 - 0.9**t)) / ((exp_avg_sq / (1 - 0.999**t)).sqrt() + 1e-8)
        reference = reference * (1 - 1e-2 * 0.1) - 1e-2 * 0.25 * basis @ direction
        assert float((reference - weight.detach().double()).abs().max()) < 1e-5
    assert float((reference - torch.randn(12, 20, generator=torch.Generator().manual_seed(0)).double()).abs().max()) > 1e-2
    assert set(opt.state[weight]) == {"step", "exp_avg", "exp_avg_sq"}
