"""Moment transfer at a refresh: the pure maps against a dense float64 reference in the full-size space."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from galore_plus.step.moment_transfer import basis_change, transfer_exp_avg, transfer_exp_avg_sq, transfer_moments


def orthonormal(size: int, rank: int, side: str, generator: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(size, rank, generator=generator, dtype=torch.float64))
    return q if side == "left" else q.t().contiguous()


def dense_reference(exp_avg, exp_avg_sq, old, new, side):
    """Full-size formulation, float64: M as a full matrix, and each row (input side) or column
    (output side) of the gradient as a d x d covariance: the old basis vectors with variances V,
    isotropic with the mean of V outside the old subspace. New coordinates are read from those."""
    if side == "left":
        exp_avg_t, exp_avg_sq_t, old_t, new_t = exp_avg.t(), exp_avg_sq.t(), old.t(), new.t()
        m_ref, v_ref = dense_reference(exp_avg_t, exp_avg_sq_t, old_t, new_t, "right")
        return m_ref.t(), v_ref.t()
    full_exp_avg = exp_avg @ old                                   # (m, n): M in the full space
    new_exp_avg = full_exp_avg @ new.t()
    d = old.shape[1]
    outside = torch.eye(d, dtype=torch.float64) - old.t() @ old    # projector onto the old subspace's complement
    rows = []
    for variances in exp_avg_sq:
        covariance = old.t() @ torch.diag(variances) @ old + variances.mean() * outside
        rows.append(torch.stack([vector @ covariance @ vector for vector in new]))
    return new_exp_avg, torch.stack(rows)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    other=st.integers(1, 9), d=st.integers(2, 12), data=st.data(), side=st.sampled_from(["left", "right"]),
    seed=st.integers(0, 2**16),
)
def test_transfer_equals_dense_float64_reference(other, d, data, side, seed):
    rank = data.draw(st.integers(1, d))
    generator = torch.Generator().manual_seed(seed)
    old, new = orthonormal(d, rank, side, generator), orthonormal(d, rank, side, generator)
    shape = (rank, other) if side == "left" else (other, rank)
    exp_avg = torch.randn(shape, generator=generator, dtype=torch.float64)
    exp_avg_sq = torch.rand(shape, generator=generator, dtype=torch.float64)
    got_m, got_v = transfer_moments(exp_avg, exp_avg_sq, old, new, side)
    want_m, want_v = dense_reference(exp_avg, exp_avg_sq, old, new, side)
    torch.testing.assert_close(got_m, want_m, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_v, want_v, rtol=1e-10, atol=1e-12)
    assert bool((got_v >= 0).all())


def test_first_moment_in_both_subspaces_is_carried_exactly():
    """A full-size M lying in span(old) and span(new) is reproduced by back-projecting its new coordinates."""
    generator = torch.Generator().manual_seed(0)
    d, rank = 10, 4
    shared = orthonormal(d, 2, "right", generator)                  # 2 directions both bases contain
    complement = torch.linalg.qr(torch.cat([shared.t(), torch.randn(d, 4, generator=generator, dtype=torch.float64)], 1))[0]
    old = torch.cat([shared, complement[:, 2:4].t()])               # shared + 2 old-only directions
    new = torch.cat([complement[:, 4:6].t(), shared.flip(0)])       # 2 new-only + shared (reordered)
    full = torch.randn(5, 2, generator=generator, dtype=torch.float64) @ shared
    exp_avg = full @ old.t()
    moved = transfer_exp_avg(exp_avg, basis_change(old, new, "right"), "right")
    torch.testing.assert_close(moved @ new, full, rtol=0, atol=1e-12)
    assert float(exp_avg.abs().max()) > 0.1
    torch.testing.assert_close(moved[:, :2], torch.zeros(5, 2, dtype=torch.float64), rtol=0, atol=1e-12)


def test_same_subspace_permuted_and_sign_flipped_moves_moments_with_their_directions():
    generator = torch.Generator().manual_seed(1)
    old = orthonormal(12, 5, "left", generator)
    order = torch.tensor([3, 0, 4, 1, 2])
    signs = torch.tensor([1.0, -1.0, 1.0, -1.0, -1.0], dtype=torch.float64)
    new = old[:, order] * signs
    exp_avg = torch.randn(5, 7, generator=generator, dtype=torch.float64)
    exp_avg_sq = torch.rand(5, 7, generator=generator, dtype=torch.float64)
    got_m, got_v = transfer_moments(exp_avg, exp_avg_sq, old, new, "left")
    torch.testing.assert_close(got_m, exp_avg[order] * signs[:, None], rtol=0, atol=1e-12)
    torch.testing.assert_close(got_v, exp_avg_sq[order], rtol=0, atol=1e-12)


def test_orthogonal_new_subspace_drops_momentum_and_gives_mean_variance():
    generator = torch.Generator().manual_seed(2)
    basis = orthonormal(10, 6, "right", generator)
    old, new = basis[:3], basis[3:]
    exp_avg = torch.randn(4, 3, generator=generator, dtype=torch.float64)
    exp_avg_sq = torch.rand(4, 3, generator=generator, dtype=torch.float64)
    got_m, got_v = transfer_moments(exp_avg, exp_avg_sq, old, new, "right")
    assert float(got_m.abs().max()) < 1e-12
    torch.testing.assert_close(got_v, exp_avg_sq.mean(1, keepdim=True).expand(4, 3), rtol=0, atol=1e-12)


def test_second_moment_of_a_half_overlapping_direction_mixes_old_variance_and_mean():
    """New direction (e0 + e2)/sqrt(2) against old basis (e0, e1): weight 1/2 on V_0, 1/2 on mean(V)."""
    old = torch.eye(4, dtype=torch.float64)[:2]
    new = torch.tensor([[2**-0.5, 0.0, 2**-0.5, 0.0], [0.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    exp_avg_sq = torch.tensor([[4.0, 2.0]], dtype=torch.float64)
    got = transfer_exp_avg_sq(exp_avg_sq, basis_change(old, new, "right"), "right")
    torch.testing.assert_close(got, torch.tensor([[0.5 * 4.0 + 0.5 * 3.0, 2.0]], dtype=torch.float64))
